"""iomux.Selector behaves as selectors.BaseSelector, and asyncio runs on it."""

from __future__ import annotations

import asyncio
import selectors
import socket
import sys
from typing import Any

import pytest

import iomux


@pytest.fixture
def sel(driver: type[iomux.Multiplexer]) -> iomux.Selector:
    s = iomux.Selector(driver())
    yield s  # type: ignore[misc]
    s.close()


def test_selector_contract(sel: iomux.Selector) -> None:
    a, b = socket.socketpair()
    with a, b:
        key = sel.register(a, selectors.EVENT_READ, "d")
        assert key == selectors.SelectorKey(a, a.fileno(), selectors.EVENT_READ, "d")
        assert sel.get_key(a) is key and sel.get_map()[a.fileno()] is key
        assert len(sel.get_map()) == 1 and list(sel.get_map()) == [a.fileno()]
        with pytest.raises(KeyError):
            sel.register(a, selectors.EVENT_READ)
        with pytest.raises(ValueError):
            sel.register(b, 0)
        with pytest.raises(ValueError):
            sel.register(object(), selectors.EVENT_READ)
        with pytest.raises(KeyError):
            sel.get_key(b)
        b.send(b"x")
        assert sel.select(1) == [(key, selectors.EVENT_READ)]
        reg = sel.multiplexer[a]
        key2 = sel.modify(a, selectors.EVENT_READ, "new data")
        assert key2.data == "new data"
        assert sel.multiplexer[a] is reg  # data-only modify leaves the kernel alone
        key3 = sel.modify(a, selectors.EVENT_WRITE)
        assert sel.multiplexer[a].interest == iomux.Interest.WRITE
        assert sel.select(0) == [(key3, selectors.EVENT_WRITE)]
        assert sel.unregister(a) is key3
        with pytest.raises(KeyError):
            sel.unregister(a)
    sel.close()
    assert sel.get_map() is None
    with pytest.raises(RuntimeError):
        sel.get_key(a)


@pytest.fixture(params=["iomux", "stdlib"])
def any_selector(request: pytest.FixtureRequest, driver: type[iomux.Multiplexer]) -> Any:
    """iomux.Selector on the driver, and the standard library's selector to compare with."""
    if request.param == "iomux":
        return iomux.Selector(driver())
    return selectors.DefaultSelector()


def test_map_taken_before_close_behaves_as_empty(any_selector: Any) -> None:
    sel = any_selector
    a, b = socket.socketpair()
    with a, b:
        key = sel.register(a, selectors.EVENT_READ, "d")
        mapping = sel.get_map()
        assert mapping[a] is key and mapping.get(a) is key and len(mapping) == 1
        sel.close()
        assert sel.get_map() is None
        with pytest.raises(RuntimeError):
            sel.get_key(a)
        with pytest.raises(KeyError):
            mapping[a]
        with pytest.raises(KeyError):
            mapping[a.fileno()]
        assert mapping.get(a) is None
        assert len(mapping) == 0 and list(mapping) == []
        assert a not in mapping


async def _echo_roundtrip() -> bytes:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = bytes(range(256)) * 4096  # 1 MiB: exercises backpressure
    writer.write(payload)
    await writer.drain()
    got = await reader.readexactly(len(payload))
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()
    await asyncio.sleep(0.01)
    return got


def test_asyncio_on_backend(driver: type[iomux.Multiplexer]) -> None:
    # Stock asyncio's selector loop on an iomux.Selector...
    selector_loop = asyncio.SelectorEventLoop(iomux.Selector(driver.name))
    try:
        assert selector_loop._selector.backend == driver.name  # type: ignore[attr-defined]
        got = selector_loop.run_until_complete(_echo_roundtrip())
        assert got == bytes(range(256)) * 4096
    finally:
        selector_loop.close()
    # ...and iomux's own loop, which new_event_loop() now returns.
    loop = iomux.new_event_loop(driver.name)
    try:
        assert isinstance(loop, iomux.Reactor) and isinstance(loop, asyncio.AbstractEventLoop)
        assert loop.backend == driver.name
        assert loop.run_until_complete(_echo_roundtrip()) == bytes(range(256)) * 4096
    finally:
        loop.close()


def test_iomux_run_and_policy(driver: type[iomux.Multiplexer]) -> None:
    async def which() -> str:
        return asyncio.get_running_loop().backend  # type: ignore[attr-defined,no-any-return]

    assert iomux.run(which(), backend=driver.name) == driver.name
    if sys.version_info >= (3, 12):
        got = asyncio.run(which(), loop_factory=lambda: iomux.new_event_loop(driver.name))
        assert got == driver.name
    policy = iomux.EventLoopPolicy(driver.name)
    loop = policy.new_event_loop()
    try:
        assert loop.run_until_complete(which()) == driver.name
    finally:
        loop.close()
