"""Echo server on stock asyncio (or uvloop with ``--uvloop``), Protocol-based.

``python -m iomux.bench.aio_echo --port P [--host H] [--uvloop]`` serves until
SIGTERM or SIGINT, then exits 0. It is the peer the iomux reactor is compared
with in ``iomux bench echo`` and ``iomux bench idle``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import cast


class EchoProtocol(asyncio.Protocol):
    """Write back whatever arrives."""

    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def serve(host: str, port: int, backlog: int) -> None:
    """Serve echo on ``host:port`` until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    server = await loop.create_server(EchoProtocol, host, port, reuse_address=True, backlog=backlog)
    async with server:
        await stop


def main() -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backlog", type=int, default=1024)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.run(serve(args.host, args.port, args.backlog))
    else:
        asyncio.run(serve(args.host, args.port, args.backlog))


if __name__ == "__main__":
    main()
