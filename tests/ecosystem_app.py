"""A small ASGI app that tests/test_ecosystem.py serves with uvicorn in a subprocess.

The subprocess imports it as ``ecosystem_app:app`` (the test puts this folder
on PYTHONPATH). Routes:

- ``GET /``: ``hello from uvicorn``;
- ``GET /backend``: the running loop's ``backend`` attribute (``none`` if it has none);
- ``GET /client``: the client's ``host:port`` as uvicorn saw it (keep-alive checks);
- ``POST /echo``: the request body back;
- ``GET /stream``: a chunked response of ``STREAM_CHUNKS`` parts;
- ``GET /gather?key=K&n=N``: answers once N requests with key K are in flight at
  the same time (504 after 5 s): proof that the loop serves connections concurrently.

Lifespan startup and shutdown print a line each, which the test looks for.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

STREAM_CHUNKS = 8
STREAM_CHUNK = b"0123456789abcdef" * 256  # 4 KiB

_gathering: dict[str, tuple[list[int], asyncio.Event]] = {}


def loop_backend() -> str:
    return str(getattr(asyncio.get_running_loop(), "backend", "none"))


async def _respond(
    send: Send, status: int, body: bytes, content_type: bytes = b"text/plain"
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                (b"x-loop-backend", loop_backend().encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(parts)


async def _gather(send: Send, query: dict[str, list[str]]) -> None:
    key = query.get("key", ["default"])[0]
    wanted = int(query.get("n", ["1"])[0])
    count, event = _gathering.setdefault(key, ([0], asyncio.Event()))
    count[0] += 1
    if count[0] >= wanted:
        event.set()
    try:
        await asyncio.wait_for(event.wait(), 5.0)
    except asyncio.TimeoutError:
        await _respond(send, 504, f"only {count[0]} of {wanted} arrived".encode())
        return
    await _respond(send, 200, str(count[0]).encode())


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            print(f"ecosystem_app: startup on backend {loop_backend()}", flush=True)
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            print(f"ecosystem_app: shutdown on backend {loop_backend()}", flush=True)
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI application."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        raise RuntimeError(f"unsupported scope {scope['type']}")
    path, method = scope["path"], scope["method"]
    query = parse_qs(scope.get("query_string", b"").decode())
    if path == "/" and method == "GET":
        await _respond(send, 200, b"hello from uvicorn")
    elif path == "/backend":
        await _respond(send, 200, loop_backend().encode())
    elif path == "/client":
        host, port = scope["client"]
        await _respond(send, 200, f"{host}:{port}".encode())
    elif path == "/echo" and method == "POST":
        body = await _read_body(receive)
        await _respond(send, 200, body, b"application/octet-stream")
    elif path == "/stream":
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        for _ in range(STREAM_CHUNKS):
            await send({"type": "http.response.body", "body": STREAM_CHUNK, "more_body": True})
            await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b""})
    elif path == "/gather":
        await _gather(send, query)
    else:
        await _respond(send, 404, b"not found")


if __name__ == "__main__":  # pragma: no cover
    sys.exit("serve with: python -m uvicorn ecosystem_app:app")
