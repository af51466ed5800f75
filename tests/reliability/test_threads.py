"""Threads: call_soon_threadsafe()/wakeup() hammered while the reactor serves I/O, and
timeouts far beyond what one system call can wait."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time
from collections.abc import Awaitable, Iterator
from typing import TypeVar

import pytest
from factories import keeping
from relsupport import close_loop, record

from iomux import Multiplexer
from iomux.errors import IomuxError
from iomux.reactor import Reactor, ReactorClosed
from iomux.reactor.testing import Recorder, collect_errors

T = TypeVar("T")
THREADS = 4
CALLS = 5_000
TIMEOUT = 30.0


@pytest.fixture
def reactor(driver: type[Multiplexer]) -> Iterator[Reactor]:
    r = Reactor(driver)
    try:
        yield r
    finally:
        close_loop(r)


def wait(reactor: Reactor, awaitable: Awaitable[T], timeout: float) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(awaitable, timeout)

    return reactor.run_until_complete(bounded())


def test_threadsafe_calls_hammered_during_io(reactor: Reactor, driver: type[Multiplexer]) -> None:
    errors = collect_errors(reactor)
    seen: list[list[int]] = [[] for _ in range(THREADS)]
    all_in = reactor.create_future()
    total = [0]

    def callback(tid: int, i: int) -> None:
        seen[tid].append(i)
        total[0] += 1
        if total[0] == THREADS * CALLS:
            all_in.set_result(None)

    def hammer(tid: int) -> None:
        mux = reactor.multiplexer
        for i in range(CALLS):
            reactor.call_soon_threadsafe(callback, tid, i)
            if i % 7 == 0:
                mux.wakeup()

    recs: list[Recorder] = []
    server = wait(
        reactor,
        reactor.create_server(keeping(recs, lambda: Recorder(reactor, echo=True)), "127.0.0.1", 0),
        TIMEOUT,
    )
    blob = hashlib.shake_256(b"threads").digest(4 << 20)
    client = socket.create_connection(("127.0.0.1", server.port()))
    echoed = bytearray()

    def reader() -> None:
        while len(echoed) < len(blob):
            data = client.recv(1 << 20)
            if not data:
                break
            echoed.extend(data)

    threads = [threading.Thread(target=hammer, args=(t,)) for t in range(THREADS)]
    threads += [
        threading.Thread(target=client.sendall, args=(blob,)),
        threading.Thread(target=reader),
    ]
    for t in threads:
        t.start()
    try:
        wait(reactor, all_in, TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while len(echoed) < len(blob) and time.monotonic() < deadline:
            reactor.run_once(0.01)
    finally:
        client.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(TIMEOUT)
        client.close()
    assert all(s == list(range(CALLS)) for s in seen), "a call was lost, doubled or reordered"
    assert bytes(echoed) == blob
    assert errors == []
    record("threads", driver.name, threads=THREADS, calls=THREADS * CALLS, echoed=len(blob))


def test_threadsafe_calls_racing_close_get_a_clear_error(reactor: Reactor) -> None:
    """Callers racing close() see ReactorClosed (an IomuxError), nothing else."""
    failures: list[BaseException] = []
    started = threading.Barrier(THREADS + 1)

    def hammer() -> None:
        started.wait()
        try:
            while True:
                reactor.call_soon_threadsafe(lambda: None)
        except ReactorClosed:
            pass
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(THREADS)]
    for t in threads:
        t.start()
    started.wait()
    reactor.run_once(0.01)
    reactor.close()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads)
    # The reactor checks it is open before it wakes the multiplexer, so a
    # close in between may surface as the multiplexer's own "closed" error.
    assert all(isinstance(f, IomuxError) and "closed" in str(f) for f in failures), failures


def test_timers_and_waits_far_beyond_a_system_calls_range(
    reactor: Reactor, driver: type[Multiplexer]
) -> None:
    """A timeout longer than select/poll/epoll can express waits; it does not raise."""
    mux = reactor.multiplexer
    threading.Timer(0.1, mux.wakeup).start()
    t0 = time.monotonic()
    assert mux.poll(1e12) == []
    assert 0.09 <= time.monotonic() - t0 < 5
    late = reactor.call_later(1e10, lambda: None)  # a deadline centuries away
    ran = reactor.create_future()
    threading.Timer(0.1, reactor.call_soon_threadsafe, (ran.set_result, "woken")).start()
    assert wait(reactor, ran, 5) == "woken"
    late.cancel()
