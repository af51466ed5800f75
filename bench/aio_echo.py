"""Echo server on an asyncio event loop: stock asyncio, uvloop, rloop or iomux's loop.

``python -m iomux.bench.aio_echo --port P [--host H] [--loop LOOP] [--backend B] [--streams]``
serves until SIGTERM or SIGINT, then exits 0. ``--loop`` is ``asyncio``
(default), ``uvloop``, ``rloop`` (``rloop.new_event_loop()``) or ``iomux``
(``iomux.new_event_loop(B)``, which must report ``backend == B``); ``--uvloop``
is ``--loop uvloop``. The server is an ``asyncio.Protocol`` that writes back what
it receives, or with ``--streams`` an ``asyncio.start_server`` handler doing
``reader.read`` / ``writer.write`` / ``await writer.drain()``. These are the
asyncio-loop servers of ``iomux bench echo`` (and the peers of ``bench idle``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, cast

LOOPS = ("asyncio", "uvloop", "rloop", "iomux")
READ_SIZE = 65536


class EchoProtocol(asyncio.Protocol):
    """Write back whatever arrives."""

    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def echo_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo one connection with the streams API until EOF."""
    try:
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(host: str, port: int, backlog: int, streams: bool = False) -> None:
    """Serve echo on ``host:port`` until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    server: asyncio.AbstractServer
    if streams:
        server = await asyncio.start_server(
            echo_stream, host, port, reuse_address=True, backlog=backlog
        )
    else:
        server = await loop.create_server(
            EchoProtocol, host, port, reuse_address=True, backlog=backlog
        )
    async with server:
        await stop


def loop_factory(name: str, backend: str | None = None) -> Callable[[], asyncio.AbstractEventLoop]:
    """A callable making a new loop of kind ``name`` (one of :data:`LOOPS`)."""
    if name == "asyncio":
        return asyncio.new_event_loop
    if name == "iomux":
        import iomux

        def make() -> asyncio.AbstractEventLoop:
            loop = iomux.new_event_loop(backend)
            got = getattr(loop, "backend", None)
            if backend is not None and got != backend:
                loop.close()
                raise SystemExit(f"aio_echo: asked for backend {backend}, the loop runs on {got}")
            return loop

        return make
    if name in ("uvloop", "rloop"):
        module: Any = importlib.import_module(name)
        return cast(Callable[[], asyncio.AbstractEventLoop], module.new_event_loop)
    raise SystemExit(f"aio_echo: unknown loop {name!r} (one of {', '.join(LOOPS)})")


def run_on(
    factory: Callable[[], asyncio.AbstractEventLoop],
    main: Callable[[], Coroutine[Any, Any, None]],
) -> None:
    """``asyncio.run(main())`` on a loop from ``factory`` (Python 3.10 has no loop_factory)."""
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.get_loop()  # make the loop before the coroutine: no "never awaited"
            runner.run(main())
        return
    loop = factory()  # pragma: no cover - Python 3.10
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main())
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def main() -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backlog", type=int, default=1024)
    parser.add_argument("--loop", choices=LOOPS, default="asyncio", help="the event loop")
    parser.add_argument("--uvloop", action="store_true", help="same as --loop uvloop")
    parser.add_argument("--backend", help="the iomux backend (with --loop iomux)")
    parser.add_argument(
        "--streams", action="store_true", help="asyncio streams instead of a Protocol"
    )
    args = parser.parse_args()
    name = "uvloop" if args.uvloop else args.loop
    if args.backend and name != "iomux":
        parser.error("--backend needs --loop iomux")
    factory = loop_factory(name, args.backend)
    run_on(factory, lambda: serve(args.host, args.port, args.backlog, args.streams))


if __name__ == "__main__":
    main()
