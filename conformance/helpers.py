"""Small helpers the conformance tests share: fds, readiness and timing."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

from iomux.multiplexer import Event, Multiplexer


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A non-blocking connected AF_UNIX stream pair."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def ready_fds(events: list[Event]) -> dict[int, int]:
    """Map fd -> int mask of a poll() result, checking no fd appears twice."""
    out: dict[int, int] = {}
    for ev in events:
        assert ev.fd not in out, f"fd {ev.fd} reported twice in one poll(): {events}"
        out[ev.fd] = int(ev.events)
    return out


def poll_until(mux: Multiplexer, fd: int, timeout: float = 2.0) -> Event:
    """Poll until ``fd`` is reported; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"fd {fd} was not reported within {timeout} s")
        for ev in mux.poll(left):
            if ev.fd == fd:
                return ev


def drain(sock: socket.socket) -> bytes:
    """Read a non-blocking socket until EAGAIN or EOF."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@contextmanager
def fd_budget(needed: int) -> Iterator[None]:
    """Raise the soft RLIMIT_NOFILE so that ``needed`` more fds can be opened."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, len(os.listdir("/proc/self/fd")) + needed + 64))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
