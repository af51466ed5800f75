"""asyncio compatibility: close and shutdown ordering (loop.close() with live
servers and connections, transports closed first, tasks cancelled at exit)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

from .aio_support import PY312, Garbage, Recorder, ServerRecorders, needs_python, run

Loop = asyncio.AbstractEventLoop
LoopFactory = Callable[[], Loop]
T = TypeVar("T")


def test_close_clears_pending_callbacks(aio_loop: Loop) -> None:
    seen: list[str] = []
    aio_loop.call_soon(seen.append, "soon")
    aio_loop.call_later(0.01, seen.append, "later")
    aio_loop.close()
    assert seen == [] and aio_loop.is_closed()


def test_loop_close_with_a_server_and_open_connections(aio_loop: Loop) -> None:
    """asyncio's close() does not close servers or transports: it returns at once,
    and what was left open is closed when collected, with a ResourceWarning."""
    reported: list[dict[str, Any]] = []
    aio_loop.set_exception_handler(lambda loop, ctx: reported.append(ctx))

    async def main() -> tuple[asyncio.AbstractServer, ServerRecorders, Recorder]:
        factory = ServerRecorders(aio_loop, echo=True)
        server = await aio_loop.create_server(factory, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()
        client = Recorder(aio_loop)
        await aio_loop.create_connection(lambda: client, *address)
        client.tr.write(b"open")
        await client.wait_data(4)
        return server, factory, client

    server, factory, client = run(aio_loop, main())
    aio_loop.close()
    assert aio_loop.is_closed()
    assert not client.lost.done() and not factory.protocols[0].lost.done()
    assert reported == []
    with Garbage() as garbage:
        del server, factory, client
    unclosed = garbage.resource_warnings()
    assert sum("unclosed transport" in m for m in unclosed) == 2, unclosed
    assert garbage.unraisable == []


def test_transports_and_servers_closed_before_the_loop(aio_loop: Loop) -> None:
    async def main() -> list[Recorder]:
        factory = ServerRecorders(aio_loop, echo=True)
        server = await aio_loop.create_server(factory, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()
        clients = [Recorder(aio_loop) for _ in range(5)]
        for client in clients:
            await aio_loop.create_connection(lambda c=client: c, *address)  # type: ignore[misc]
            client.tr.write(b"x")
            await client.wait_data(1)
        for client in clients:
            client.tr.close()
        server.close()
        await server.wait_closed()
        await asyncio.gather(*(c.lost for c in clients))
        await asyncio.gather(*(p.lost for p in factory.protocols))
        return clients + factory.protocols

    protocols = run(aio_loop, main())
    assert all(p.lost.result() is None for p in protocols)
    assert all(p.sequence()[-1] == "connection_lost" for p in protocols)
    aio_loop.close()
    with Garbage() as garbage:
        del protocols
    assert garbage.resource_warnings() == [] and garbage.unraisable == []


class _Background:
    """main() for a runner: it leaves a task blocked on a socket and a suspended
    async generator; the runner must cancel the one (which still awaits in its
    cleanup) and then finalize the other, in that order, before closing."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.kept: list[Any] = []  # the generator and the peer socket outlive main()

    async def agen(self) -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            self.log.append("agen finalized")

    async def blocked(self, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            await reader.read(100)
        except asyncio.CancelledError:
            self.log.append("cancelled")
            writer.close()
            await writer.wait_closed()  # the loop still runs for the cleanup
            self.log.append("closed")
            raise

    async def main(self) -> str:
        a, b = socket.socketpair()
        self.kept.append(b)
        asyncio.get_running_loop().create_task(self.blocked(a))
        gen = self.agen()
        self.kept.append(gen)
        assert await gen.__anext__() == 1
        await asyncio.sleep(0.01)
        return "main done"

    def close(self) -> None:
        for obj in self.kept:
            if isinstance(obj, socket.socket):
                obj.close()
        self.kept.clear()


@needs_python((3, 11), "asyncio.Runner")
def test_runner_cancels_tasks_then_finalizes_generators_at_exit(
    aio_loop_factory: LoopFactory,
) -> None:
    work = _Background()
    try:
        with asyncio.Runner(loop_factory=aio_loop_factory) as runner:  # type: ignore[attr-defined, unused-ignore]
            assert runner.run(work.main()) == "main done"
            loop = runner.get_loop()
            assert work.log == []
        assert loop.is_closed()
        assert work.log == ["cancelled", "closed", "agen finalized"]
    finally:
        work.close()


def test_asyncio_run_cancels_tasks_then_finalizes_generators_at_exit(
    aio_loop_factory: LoopFactory,
) -> None:
    work = _Background()
    made: list[Loop] = []

    def factory() -> Loop:
        made.append(aio_loop_factory())
        return made[-1]

    try:
        assert _asyncio_run(work.main(), factory) == "main done"
        assert len(made) == 1 and made[0].is_closed()
        assert work.log == ["cancelled", "closed", "agen finalized"]
    finally:
        work.close()


def _asyncio_run(coro: Coroutine[Any, Any, T], factory: LoopFactory) -> T:
    """asyncio.run on a loop from ``factory``: loop_factory= from 3.12, a policy before."""
    if PY312:
        return asyncio.run(coro, loop_factory=factory)  # type: ignore[call-arg, unused-ignore]

    class Policy(asyncio.DefaultEventLoopPolicy):
        def new_event_loop(self) -> Loop:
            return factory()

    old = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(Policy())
    try:
        return asyncio.run(coro)
    finally:
        asyncio.set_event_loop_policy(old)
