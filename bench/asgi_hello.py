"""The hello-world ASGI app that ``iomux bench http`` serves with uvicorn.

``python -m uvicorn iomux.bench.asgi_hello:app --http httptools --loop LOOP``
answers every request with the same 200 ``Hello, World!`` (text/plain) as
``bench/aio_http.py``; uvicorn adds its ``date`` and ``server`` headers.

With lifespan on (uvicorn's default) it prints the loop it runs on at startup,
and when ``IOMUX_BENCH_BACKEND`` is set it refuses to start unless the loop's
``backend`` attribute equals it: a uvicorn peer on ``--loop iomux:new_event_loop``
never runs silently on another backend.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

BODY = b"Hello, World!"
START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())],
}
RESPONSE: Message = {"type": "http.response.body", "body": BODY}


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            loop = asyncio.get_running_loop()
            got = getattr(loop, "backend", None)
            wanted = os.environ.get("IOMUX_BENCH_BACKEND")
            print(f"asgi_hello: {type(loop).__name__}, backend {got}", file=sys.stderr, flush=True)
            if wanted and got != wanted:
                await send(
                    {
                        "type": "lifespan.startup.failed",
                        "message": f"asked for backend {wanted}, the loop runs on {got}",
                    }
                )
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """The ASGI application."""
    if scope["type"] == "http":
        await send(START)
        await send(RESPONSE)
    elif scope["type"] == "lifespan":
        await _lifespan(receive, send)
