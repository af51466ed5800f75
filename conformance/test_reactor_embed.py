"""The reactor inside a host loop: run_once, fileno() inside asyncio, a thread of its own."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from iomux import Multiplexer
from iomux.reactor import EmbeddingUnsupported, Reactor, Server
from iomux.reactor.embed import AsyncioEmbedding, ReactorThread
from iomux.reactor.testing import Recorder, recording

from .reactor_support import MODES, close_reactor, mode_options, new_reactor, require_mode, wait

TIMEOUT = 5.0


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def reactor(driver: type[Multiplexer], mode: str) -> Iterator[Reactor]:
    r = new_reactor(driver, mode)
    try:
        yield r
    finally:
        close_reactor(r)


def _has_pollable_fd(reactor: Reactor) -> bool:
    return reactor.multiplexer.capabilities.pollable_fd


def test_host_loop_with_run_once(reactor: Reactor) -> None:
    """A host that owns the loop calls run_once(timeout) itself."""
    recs: list[Recorder] = []
    server = wait(
        reactor,
        reactor.create_server(
            recording(recs, lambda: Recorder(reactor, echo=True)), "127.0.0.1", 0
        ),
        TIMEOUT,
    )
    fired: list[float] = []
    reactor.call_later(0.05, lambda: fired.append(time.monotonic()))
    with socket.create_connection(("127.0.0.1", server.port()), timeout=TIMEOUT) as raw:
        raw.sendall(b"ping")
        raw.setblocking(False)
        got = b""
        deadline = time.monotonic() + TIMEOUT
        host_ticks = 0
        while (got != b"ping" or not fired) and time.monotonic() < deadline:
            host_ticks += 1  # the host's own work would go here
            reactor.run_once(0.01)
            assert not reactor.is_running()  # run_once returns the loop to the host
            try:
                got += raw.recv(100)
            except BlockingIOError:
                pass
        assert got == b"ping" and fired
        assert host_ticks > 1
    assert recs[0].sequence()[:2] == ["made", "data"]


def test_run_once_waits_at_most_its_timeout(reactor: Reactor) -> None:
    start = time.monotonic()
    reactor.run_once(0.05)
    took = time.monotonic() - start
    assert 0.05 <= took < 1.0, took
    assert reactor.next_timeout() is None


def test_fileno_inside_asyncio(reactor: Reactor) -> None:
    if not _has_pollable_fd(reactor):
        pytest.skip(f"{reactor.multiplexer.name} declares no capability pollable_fd")

    async def main() -> tuple[bytes, list[str], float]:
        loop = asyncio.get_running_loop()
        embedding = AsyncioEmbedding(reactor, loop)
        try:
            recs: list[Recorder] = []
            server: Server = await asyncio.wait_for(
                embedding.run(
                    reactor.create_server(
                        recording(recs, lambda: Recorder(reactor, echo=True)), "127.0.0.1", 0
                    )
                ),
                TIMEOUT,
            )
            # An asyncio client talks to the reactor's server in the same thread.
            r, w = await asyncio.open_connection("127.0.0.1", server.port())
            w.write(b"through asyncio")
            echoed = await asyncio.wait_for(r.readexactly(15), TIMEOUT)
            # A reactor client, awaited from asyncio, and a reactor timer.
            client = Recorder(reactor)
            transport, _ = await asyncio.wait_for(
                embedding.run(
                    reactor.create_connection(lambda: client, "127.0.0.1", server.port())
                ),
                TIMEOUT,
            )
            assert transport is client.transport
            start = time.monotonic()
            await asyncio.wait_for(embedding.run(asyncio.sleep(0.05)), TIMEOUT)
            slept = time.monotonic() - start
            w.close()
            await w.wait_closed()
            # Work scheduled on the reactor from host code runs after kick().
            ran = loop.create_future()
            reactor.call_soon(lambda: loop.call_soon(ran.set_result, None))
            embedding.kick()
            await asyncio.wait_for(ran, TIMEOUT)
            return echoed, client.sequence(), slept
        finally:
            embedding.close()

    echoed, sequence, slept = asyncio.run(asyncio.wait_for(main(), 2 * TIMEOUT))
    assert echoed == b"through asyncio"
    assert sequence == ["made"]
    assert slept >= 0.05


def test_fileno_without_pollable_fd_is_a_clear_error(reactor: Reactor) -> None:
    if _has_pollable_fd(reactor):
        assert reactor.fileno() == reactor.multiplexer.fileno()
        return
    with pytest.raises(EmbeddingUnsupported, match="thread"):
        reactor.fileno()


def test_reactor_in_its_own_thread(driver: type[Multiplexer], mode: str) -> None:
    require_mode(driver, mode)
    thread = ReactorThread(Reactor(driver, **mode_options(mode)))
    thread.start()
    try:
        reactor = thread.reactor
        server = thread.run(
            lambda: reactor.create_server(lambda: Recorder(reactor, echo=True), "127.0.0.1", 0)
        )
        with socket.create_connection(("127.0.0.1", server.port()), timeout=TIMEOUT) as raw:
            raw.sendall(b"from the main thread")
            assert raw.recv(100) == b"from the main thread"
        # call_soon_threadsafe wakes a loop blocked in poll().
        start = time.monotonic()
        assert thread.call(lambda: threading.get_ident()) != threading.get_ident()
        assert thread.call(os.getpid) == os.getpid()
        assert time.monotonic() - start < 1.0
        thread.call(server.close)
    finally:
        thread.stop()
    assert thread.reactor.is_closed()
