"""``python -m iomux serve``: echo and HTTP over real sockets, workers, SIGTERM exits 0."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from iomux.reactor import Reactor
from iomux.reactor.testing import Recorder


@contextmanager
def serving(*args: str) -> Iterator[tuple[int, str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "iomux", "serve", *args, "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.search(r"(?:127\.0\.0\.1:| port )(\d+)", line)
        assert match, line
        yield int(match.group(1)), line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_echo(workers: str) -> None:
    with serving("echo", "--backend", "poll", "--workers", workers) as (port, line):
        assert "backend poll" in line and "requested 'poll' by argument" in line
        for i in range(4):  # with 2 workers the kernel spreads these
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                c.sendall(b"echo %d" % i)
                assert c.recv(100) == b"echo %d" % i


def test_serve_http_keep_alive_and_pipelining() -> None:
    pytest.importorskip("httptools", reason="the http server needs the iomux[http] extra")
    with serving("http", "--backend", "select") as (port, _):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
            got = b""
            while got.count(b"Hello, World!") < 2:
                got += c.recv(4096)
            assert got.count(b"HTTP/1.1 200 OK") == 2
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            rest = b""
            while chunk := c.recv(4096):
                rest += chunk
            assert b"Connection: close" in rest and rest.endswith(b"Hello, World!")
            c2 = socket.create_connection(("127.0.0.1", port), timeout=5)
            c2.sendall(b"NOT HTTP\r\n\r\n")
            assert c2.recv(100).startswith(b"HTTP/1.1 400")
            c2.close()


def test_sigterm_closes_idle_keep_alive_connection() -> None:
    pytest.importorskip("httptools", reason="the http server needs the iomux[http] extra")
    proc = subprocess.Popen(
        [sys.executable, "-m", "iomux", "serve", "http", "--backend", "epoll", "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        port = int(re.findall(r":(\d+);", proc.stderr.readline())[0])
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"Hello" in c.recv(4096)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert c.recv(100) == b""  # closed at once: it was between requests
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - start < 3
        c.close()
    finally:
        proc.kill()
        proc.wait()


def test_create_connection_resolves_names_off_thread() -> None:
    reactor = Reactor("epoll")
    try:
        server = reactor.run_until_complete(
            reactor.create_server(lambda: Recorder(reactor), "127.0.0.1", 0)
        )
        client = Recorder(reactor)
        resolver_threads: list[str] = []
        real_getaddrinfo = socket.getaddrinfo

        def getaddrinfo(*args: Any, **kwargs: Any) -> Any:
            resolver_threads.append(threading.current_thread().name)
            return real_getaddrinfo(*args, **kwargs)

        socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]
        try:
            connecting = reactor.create_connection(lambda: client, "localhost", server.port())
            reactor.run_until_complete(asyncio.wait_for(connecting, 5))
        finally:
            socket.getaddrinfo = real_getaddrinfo
        assert client.transport.get_extra_info("peername")[1] == server.port()
        assert resolver_threads and threading.main_thread().name not in resolver_threads
        client.transport.close()
        reactor.run_until_complete(asyncio.wait_for(client.lost, 5))
    finally:
        reactor.close()


def test_workers_exit_when_parent_is_killed() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "iomux", "serve", "echo", "--workers", "2", "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    port = int(re.findall(r" port (\d+)", proc.stderr.readline())[0])
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return
        time.sleep(0.1)
    raise AssertionError("orphaned workers kept serving after the parent was killed")
