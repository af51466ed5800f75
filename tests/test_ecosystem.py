"""Real libraries on iomux's event loop, on every backend: aiohttp and uvicorn.

- aiohttp's web server and its client (``ClientSession``) on the same
  ``iomux.new_event_loop(backend)``: text, JSON, a ~1 MiB POST echo, a
  streaming response, a websocket echo, concurrent requests.
- uvicorn + httptools in a subprocess with ``--loop iomux:new_event_loop`` and
  ``IOMUX_BACKEND``, serving ``tests/ecosystem_app.py``, checked with
  http.client: keep-alive, concurrent connections, the loop's backend, a clean
  exit on SIGTERM.

A backend that cannot run here fails with the reason; it is never skipped.
The ``stock-asyncio`` and ``stock-uvloop`` cases run the same checks on the
loops iomux stands beside, so a failure only on iomux names the loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import iomux

BACKENDS = ("select", "poll", "epoll", "io_uring")
#: Loops run as controls: what the iomux backends are compared with.
STOCK = ("stock-asyncio", "stock-uvloop")
LOOPS = (*BACKENDS, *STOCK)
#: The ``backend`` a stock loop reports (it has no such attribute).
NO_BACKEND = "none"
HERE = Path(__file__).resolve().parent
TIMEOUT = 20.0  # seconds, for any one exchange or wait in this file

BIG = hashlib.sha256(b"iomux").digest() * (1024 * 1024 // 32) + b"tail-bytes"  # ~1 MiB
STREAM_PARTS = 256
STREAM_PART = bytes(range(256)) * 64  # 16 KiB: 4 MiB in all, more than the socket buffers
FILE_BODY = hashlib.sha256(b"file").digest() * 20_000  # 640,000 bytes, sent by loop.sendfile


def expected_backend(name: str) -> str:
    return NO_BACKEND if name in STOCK else name


def require_backend(name: str) -> None:
    """Fail (never skip) when an iomux backend cannot run here."""
    if name in STOCK:
        if name == "stock-uvloop":
            pytest.importorskip("uvloop", reason="uvloop control: not installed")
        return
    infos = {info.name: info for info in iomux.backends()}
    assert name in infos, f"iomux does not know the backend {name!r}: {sorted(infos)}"
    assert infos[name].available, f"backend {name} cannot run here: {infos[name].reason}"


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "stock-asyncio":
        return asyncio.new_event_loop
    if name == "stock-uvloop":
        import uvloop

        return uvloop.new_event_loop
    return lambda: iomux.new_event_loop(name)


def run_on(name: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main()`` on a fresh loop for ``name``, bounded by TIMEOUT, and close it."""
    require_backend(name)
    loop = loop_factory(name)()
    try:
        assert getattr(loop, "backend", NO_BACKEND) == expected_backend(name)
        loop.run_until_complete(asyncio.wait_for(main(), TIMEOUT))
    finally:
        try:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


def handler_backend() -> str:
    return str(getattr(asyncio.get_running_loop(), "backend", NO_BACKEND))


# ---------------------------------------------------------------- aiohttp


def aiohttp_app(tmp_path: Path) -> web.Application:
    served = tmp_path / "served.bin"
    served.write_bytes(FILE_BODY)

    async def text(request: web.Request) -> web.Response:
        return web.Response(
            text="hello from aiohttp", headers={"X-Loop-Backend": handler_backend()}
        )

    async def json_(request: web.Request) -> web.Response:
        return web.json_response({"backend": handler_backend(), "query": dict(request.query)})

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        digest = hashlib.sha256(body).hexdigest()
        return web.Response(
            body=body, content_type="application/octet-stream", headers={"X-Body-SHA256": digest}
        )

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(STREAM_PARTS):
            await response.write(STREAM_PART)
        await response.write_eof()
        return response

    async def file(request: web.Request) -> web.FileResponse:
        return web.FileResponse(served)  # loop.sendfile, or aiohttp's fallback

    async def executor(request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(None, served.read_bytes)
        return web.Response(text=hashlib.sha256(data).hexdigest())

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                if msg.data == "backend?":
                    await ws.send_str(handler_backend())
                elif msg.data == "close":
                    await ws.close()
                else:
                    await ws.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.add_routes(
        [
            web.get("/text", text),
            web.get("/json", json_),
            web.post("/echo", echo),
            web.get("/stream", stream),
            web.get("/file", file),
            web.get("/executor", executor),
            web.get("/ws", websocket),
        ]
    )
    return app


async def aiohttp_exchange(backend: str, tmp_path: Path) -> None:
    want = expected_backend(backend)
    runner = web.AppRunner(aiohttp_app(tmp_path), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        base = f"http://127.0.0.1:{port}"
        timeout = aiohttp.ClientTimeout(total=TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(f"{base}/text") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
                assert resp.headers["X-Loop-Backend"] == want
                assert await resp.text() == "hello from aiohttp"

            async with session.get(f"{base}/json", params={"q": "1"}) as resp:
                assert resp.status == 200
                assert resp.content_type == "application/json"
                assert await resp.json() == {"backend": want, "query": {"q": "1"}}

            async with session.post(f"{base}/echo", data=BIG) as resp:
                assert resp.status == 200
                assert resp.headers["X-Body-SHA256"] == hashlib.sha256(BIG).hexdigest()
                assert int(resp.headers["Content-Length"]) == len(BIG)
                body = await resp.read()
                assert len(body) == len(BIG) and body == BIG

            async with session.get(f"{base}/stream") as resp:
                assert resp.status == 200
                assert resp.headers["Transfer-Encoding"] == "chunked"
                got = bytearray(await resp.content.readexactly(len(STREAM_PART)))
                # Let the server fill the socket buffers and wait on drain().
                await asyncio.sleep(0.2)
                async for part in resp.content.iter_chunked(65536):
                    got += part
                assert bytes(got) == STREAM_PART * STREAM_PARTS

            async with session.get(f"{base}/file") as resp:
                assert resp.status == 200
                assert int(resp.headers["Content-Length"]) == len(FILE_BODY)
                assert await resp.read() == FILE_BODY

            async with session.get(f"{base}/executor") as resp:
                assert resp.status == 200
                assert await resp.text() == hashlib.sha256(FILE_BODY).hexdigest()

            # By name: loop.getaddrinfo, and a refused ::1 first where localhost has it.
            async with session.get(f"http://localhost:{port}/text") as resp:
                assert resp.status == 200
                assert await resp.text() == "hello from aiohttp"

            async with session.get(f"{base}/missing") as resp:
                assert resp.status == 404

            async def one(i: int) -> dict[str, Any]:
                async with session.get(f"{base}/json", params={"i": str(i)}) as resp:
                    assert resp.status == 200
                    data: dict[str, Any] = await resp.json()
                    return data

            results = await asyncio.gather(*(one(i) for i in range(20)))
            assert [r["query"]["i"] for r in results] == [str(i) for i in range(20)]
            assert {r["backend"] for r in results} == {want}

            async with session.ws_connect(f"{base}/ws") as ws:
                await ws.send_str("backend?")
                assert await ws.receive_str(timeout=TIMEOUT) == want
                await ws.send_str("ping")
                assert await ws.receive_str(timeout=TIMEOUT) == "echo:ping"
                payload = os.urandom(100_000)
                await ws.send_bytes(payload)
                assert await ws.receive_bytes(timeout=TIMEOUT) == payload
                for i in range(50):
                    await ws.send_str(f"m{i}")
                for i in range(50):
                    assert await ws.receive_str(timeout=TIMEOUT) == f"echo:m{i}"
                await ws.send_str("close")
                msg = await ws.receive(timeout=TIMEOUT)
                assert msg.type == aiohttp.WSMsgType.CLOSE, msg
            assert ws.closed
            assert ws.close_code == aiohttp.WSCloseCode.OK
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("backend", LOOPS)
def test_aiohttp_server_and_client(backend: str, tmp_path: Path) -> None:
    run_on(backend, lambda: aiohttp_exchange(backend, tmp_path))


# ---------------------------------------------------------------- uvicorn


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def uvicorn_argv(backend: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The uvicorn command line and environment for ``backend``."""
    env = dict(os.environ)
    env.pop("IOMUX_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    if backend == "stock-asyncio":
        loop = "asyncio"
    elif backend == "stock-uvloop":
        loop = "uvloop"
    else:
        loop = "iomux:new_event_loop"
        env["IOMUX_BACKEND"] = backend
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "ecosystem_app:app",
        "--loop",
        loop,
        "--http",
        "httptools",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--timeout-graceful-shutdown",
        "5",
    ]
    return argv, env


class Uvicorn:
    """A uvicorn subprocess, killed on exit whatever happened."""

    def __init__(self, backend: str, tmp_path: Path) -> None:
        self.backend = backend
        self.port = free_port()
        argv, env = uvicorn_argv(backend, self.port)
        self.log_path = tmp_path / f"uvicorn-{backend}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            argv,
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"uvicorn exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"uvicorn did not listen on {self.port} in {TIMEOUT}s:\n{self.log()}")

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)
        self._log.close()


@pytest.fixture
def uvicorn_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Uvicorn]:
    backend: str = request.param
    require_backend(backend)
    for module, extra in (("uvicorn", "test"), ("httptools", "http")):
        assert importlib.util.find_spec(module), f"{module} is missing (the {extra} extra has it)"
    server = Uvicorn(backend, tmp_path)
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


def get(conn: http.client.HTTPConnection, path: str) -> tuple[http.client.HTTPResponse, bytes]:
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp, resp.read()


def keep_alive_session(server: Uvicorn, want: str) -> None:
    conn = server.connection()
    try:
        resp, body = get(conn, "/")
        assert (resp.status, body) == (200, b"hello from uvicorn")
        assert resp.getheader("content-type") == "text/plain"
        assert resp.getheader("content-length") == str(len(body))
        assert resp.getheader("x-loop-backend") == want
        assert not resp.will_close

        resp, first_client = get(conn, "/client")
        assert resp.status == 200

        resp, body = get(conn, "/backend")
        assert (resp.status, body.decode()) == (200, want)

        payload = os.urandom(256 * 1024)
        conn.request(
            "POST", "/echo", body=payload, headers={"Content-Type": "application/octet-stream"}
        )
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.read() == payload

        resp, body = get(conn, "/stream")
        assert resp.status == 200
        assert resp.getheader("transfer-encoding") == "chunked"
        assert body == (b"0123456789abcdef" * 256) * 8

        resp, body = get(conn, "/missing")
        assert (resp.status, body) == (404, b"not found")

        resp, again = get(conn, "/client")
        assert resp.status == 200
        # The same client address: every request above went over one connection.
        assert again == first_client
        assert not resp.will_close
    finally:
        conn.close()


def concurrent_session(server: Uvicorn, want: str, key: str, n: int) -> list[str]:
    conn = server.connection()
    try:
        resp, body = get(conn, f"/gather?key={key}&n={n}")
        assert resp.status == 200, body
        resp, backend = get(conn, "/backend")
        assert (resp.status, backend.decode()) == (200, want)
        resp, client = get(conn, "/client")
        assert resp.status == 200
        return [body.decode(), client.decode()]
    finally:
        conn.close()


@pytest.mark.parametrize("uvicorn_server", LOOPS, indirect=True)
def test_uvicorn_subprocess(uvicorn_server: Uvicorn) -> None:
    server = uvicorn_server
    want = expected_backend(server.backend)

    keep_alive_session(server, want)

    n = 4
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(concurrent_session, server, want, "round1", n) for _ in range(n)]
        results = [f.result(timeout=TIMEOUT) for f in futures]
    assert all(int(count) >= n for count, _ in results), results
    assert len({client for _, client in results}) == n, results  # n distinct connections

    server.proc.send_signal(signal.SIGTERM)
    try:
        rc = server.proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"uvicorn ignored SIGTERM for {TIMEOUT}s:\n{server.log()}")
    log = server.log()
    # uvicorn shuts down gracefully, then re-raises the signal it caught (0.29+): a
    # clean exit on SIGTERM is status -SIGTERM after the shutdown lines, or 0.
    assert rc in (0, -signal.SIGTERM), (rc, log)
    assert f"ecosystem_app: startup on backend {want}" in log, log
    assert f"ecosystem_app: shutdown on backend {want}" in log, log
    assert "Application shutdown complete." in log, log
    assert "Finished server process" in log, log
    assert "Traceback" not in log, log
