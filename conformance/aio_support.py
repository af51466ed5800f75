"""Helpers of the asyncio-compatibility section (``test_asyncio_*.py``).

Every test there runs on stock asyncio and on iomux's loop over each driver
(see ``loop_kind`` and ``aio_loop`` in the plugin). Nothing here uses more
than the public asyncio API, so the tests apply to any loop.

- :func:`run` runs a coroutine on a loop, failing after ``timeout`` seconds
  instead of hanging; :func:`run_forever` bounds ``run_forever`` the same way.
- :class:`Watchdog` is the last resort against a loop that never wakes up
  (its own timers included): SIGALRM fails the test.
- :class:`LeakCheck` fails a test that leaves fds, threads or child
  processes behind.
- :class:`Recorder` is a protocol that records its callbacks, for exact
  callback-order assertions.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Coroutine
from types import FrameType, TracebackType
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

#: The default bound on one test's coroutine.
TIMEOUT = 10.0
#: How long the watchdog lets one test (with its fixture) run before failing it.
WATCHDOG_SECONDS = 60.0

PY311 = sys.version_info >= (3, 11)
PY312 = sys.version_info >= (3, 12)
PY313 = sys.version_info >= (3, 13)
PYVER = f"{sys.version_info[0]}.{sys.version_info[1]}"


def needs_python(version: tuple[int, int], what: str) -> pytest.MarkDecorator:
    """Skip a test on Pythons before ``version``, naming the API and the running Python."""
    return pytest.mark.skipif(
        sys.version_info < version,
        reason=f"{what} is new in Python {version[0]}.{version[1]}; this is Python {PYVER}",
    )


# --- running coroutines, bounded -------------------------------------------------------


async def _bounded(aw: Awaitable[T], timeout: float) -> T:
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.wait({task}, timeout=2.0)
    raise AssertionError(f"the test's coroutine did not finish within {timeout} s")


def run(loop: asyncio.AbstractEventLoop, aw: Awaitable[T], timeout: float = TIMEOUT) -> T:
    """Run ``aw`` to completion on ``loop``; fail if it takes more than ``timeout`` s."""
    return loop.run_until_complete(_bounded(aw, timeout))


def run_forever(loop: asyncio.AbstractEventLoop, timeout: float = TIMEOUT) -> None:
    """``loop.run_forever()``, failing if nothing stops the loop within ``timeout`` s."""
    expired: list[bool] = []

    def expire() -> None:
        expired.append(True)
        loop.stop()

    guard = loop.call_later(timeout, expire)
    try:
        loop.run_forever()
    finally:
        guard.cancel()
    assert not expired, f"run_forever() was not stopped within {timeout} s"


async def wait_until(
    predicate: Callable[[], bool], timeout: float = 5.0, what: str = "the condition"
) -> None:
    """Poll ``predicate`` on the running loop every few ms until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.005)


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is left on ``loop``, shut its generators and executor down, close it."""
    if loop.is_closed():
        return
    try:
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.wait(tasks, timeout=5.0))
        run(loop, loop.shutdown_asyncgens(), timeout=5.0)
        run(loop, loop.shutdown_default_executor(), timeout=5.0)
    finally:
        loop.close()


class LoopHang(SystemExit):
    """Raised by the watchdog in the main thread; pytest reports it as a failure.

    A SystemExit, because asyncio hands any other exception raised inside a
    callback to the exception handler, where it would be lost.
    """


class Watchdog:
    """Fail the test with :class:`LoopHang` if it runs for more than ``seconds``."""

    def __init__(self, seconds: float = WATCHDOG_SECONDS) -> None:
        self.seconds = seconds
        self._old: Any = None

    def _fire(self, signum: int, frame: FrameType | None) -> None:
        signal.setitimer(signal.ITIMER_REAL, 10.0)  # and again, should the teardown hang too
        raise LoopHang(f"the test was still running after {self.seconds} s: the loop hangs")

    def __enter__(self) -> Watchdog:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(
        self, tp: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._old is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._old)


# --- leaks ------------------------------------------------------------------------------


def _fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the directory listing's own fd, closed by now
            pass
    return out


def _children() -> dict[int, str]:
    me = str(os.getpid())
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        comm, _, rest = stat.rpartition(")")
        fields = rest.split()
        if len(fields) > 1 and fields[1] == me:
            out[int(name)] = f"{comm.partition('(')[2]} state {fields[0]}"
    return out


class LeakCheck:
    """Snapshot fds, threads and child processes; :meth:`check` fails on new ones."""

    def __init__(self) -> None:
        self.fds = _fds()
        self.threads = set(threading.enumerate())
        self.children = _children()

    def check(self, grace: float = 5.0) -> None:
        """Fail the test if something it opened is still there after ``grace`` s."""
        deadline = time.monotonic() + grace
        for thread in set(threading.enumerate()) - self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        threads = [t.name for t in set(threading.enumerate()) - self.threads]
        while True:
            children = {p: d for p, d in _children().items() if p not in self.children}
            fds = {fd: path for fd, path in _fds().items() if self.fds.get(fd) != path}
            if fds:
                gc.collect()  # a dropped transport closes its socket when collected
                fds = {fd: path for fd, path in _fds().items() if self.fds.get(fd) != path}
            if not (children or fds) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        problems = []
        if fds:
            problems.append(f"fds {sorted(fds.items())}")
        if threads:
            problems.append(f"threads {threads}")
        if children:
            problems.append(f"child processes {children}")
        if problems:
            pytest.fail("the test left behind " + "; ".join(problems), pytrace=False)


class Garbage:
    """Collect garbage on exit, recording the warnings and the unraisable exceptions
    (errors in ``__del__``) raised in the block or by the collection::

        with Garbage() as garbage:
            del transport
        assert garbage.resource_warnings() ...
    """

    def __init__(self) -> None:
        self.warnings: list[warnings.WarningMessage] = []
        self.unraisable: list[str] = []
        self._catcher = warnings.catch_warnings(record=True)
        self._hook: Any = None

    def _record(self, info: Any) -> None:
        self.unraisable.append(f"{info.exc_type.__name__}: {info.exc_value} in {info.object!r}")

    def __enter__(self) -> Garbage:
        gc.collect()  # what earlier tests left is not this block's
        self.warnings = self._catcher.__enter__()
        warnings.simplefilter("always")
        self._hook = sys.unraisablehook
        sys.unraisablehook = self._record
        return self

    def __exit__(
        self, tp: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            gc.collect()
        finally:
            sys.unraisablehook = self._hook
            self._catcher.__exit__(tp, exc, tb)

    def resource_warnings(self) -> list[str]:
        """The messages of the ResourceWarnings recorded."""
        return [str(w.message) for w in self.warnings if issubclass(w.category, ResourceWarning)]


# --- protocols --------------------------------------------------------------------------


class Recorder(asyncio.Protocol):
    """A protocol that records its callbacks as ``(name, arg)`` events.

    ``data`` holds every byte received; ``made``, ``eof`` and ``lost`` are
    futures resolved by the matching callback (``lost`` with the exception
    given to ``connection_lost``). With ``echo=True`` it writes back what it
    receives; with ``close_on_eof=False`` its ``eof_received`` returns True
    (keep the transport open).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        echo: bool = False,
        close_on_eof: bool = True,
    ) -> None:
        self.loop = loop
        self.echo = echo
        self.close_on_eof = close_on_eof
        self.events: list[tuple[str, Any]] = []
        self.data = bytearray()
        self.transport: asyncio.Transport | None = None
        self.made: asyncio.Future[None] = loop.create_future()
        self.eof: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[BaseException | None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Record; keep the transport."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.events.append(("connection_made", None))
        self.made.set_result(None)

    def data_received(self, data: bytes) -> None:
        """Record (data must be bytes, as asyncio gives); echo if asked."""
        assert isinstance(data, bytes), f"data_received got {type(data).__name__}, not bytes"
        self.events.append(("data_received", data))
        self.data += data
        if self.echo:
            assert self.transport is not None
            self.transport.write(data)

    def eof_received(self) -> bool | None:
        """Record; keep the transport open if ``close_on_eof`` is false."""
        self.events.append(("eof_received", None))
        self.eof.set_result(None)
        return None if self.close_on_eof else True

    def pause_writing(self) -> None:
        """Record."""
        self.events.append(("pause_writing", None))

    def resume_writing(self) -> None:
        """Record."""
        self.events.append(("resume_writing", None))

    def connection_lost(self, exc: Exception | None) -> None:
        """Record, and resolve ``lost`` with ``exc``."""
        self.events.append(("connection_lost", exc))
        self.lost.set_result(exc)

    def sequence(self) -> list[str]:
        """The callback names in order, consecutive data_received calls merged into one."""
        names: list[str] = []
        for name, _ in self.events:
            if not (name == "data_received" and names and names[-1] == name):
                names.append(name)
        return names

    async def wait_data(self, size: int, timeout: float = 5.0) -> bytes:
        """Wait until ``size`` bytes have been received in all; return them all."""
        await wait_until(
            lambda: len(self.data) >= size, timeout, f"receiving {size} bytes ({len(self.data)})"
        )
        return bytes(self.data)

    @property
    def tr(self) -> asyncio.Transport:
        """The transport (fails if there is none yet)."""
        assert self.transport is not None, "connection_made was not called"
        return self.transport


class ServerRecorders:
    """A protocol factory for servers that keeps every protocol it made."""

    def __init__(self, loop: asyncio.AbstractEventLoop, **options: Any) -> None:
        self.loop = loop
        self.options = options
        self.protocols: list[Recorder] = []

    def __call__(self) -> Recorder:
        """A new Recorder, kept in ``protocols``."""
        proto = Recorder(self.loop, **self.options)
        self.protocols.append(proto)
        return proto

    async def first(self, timeout: float = 5.0) -> Recorder:
        """The first protocol, once its connection_made has been called."""
        await wait_until(lambda: bool(self.protocols), timeout, "an accepted connection")
        proto = self.protocols[0]
        await asyncio.wait_for(asyncio.shield(proto.made), timeout)
        return proto


async def echo_server(
    loop: asyncio.AbstractEventLoop, host: str = "127.0.0.1", **options: Any
) -> tuple[asyncio.AbstractServer, ServerRecorders, tuple[Any, ...]]:
    """A TCP echo server on ``host`` and a free port: (server, factory, its address)."""
    factory = ServerRecorders(loop, echo=True)
    server = await loop.create_server(factory, host, 0, **options)
    address = server.sockets[0].getsockname()
    return server, factory, address


async def close_server(server: asyncio.AbstractServer) -> None:
    """Close a server and wait for it."""
    server.close()
    await server.wait_closed()


def payload(size: int, seed: int = 0) -> bytes:
    """``size`` pseudo-random but reproducible bytes."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    reps, rest = divmod(size, len(block))
    return block * reps + block[:rest]


def sha(data: bytes | bytearray) -> str:
    """The SHA-256 of ``data``, to compare large transfers."""
    return hashlib.sha256(data).hexdigest()


def unused_port(family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port nothing listens on (bound then closed at once)."""
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(family, kind) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def ipv6_loopback_or_skip() -> None:
    """Skip the calling test if ::1 cannot be bound here, naming the host."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"IPv6 loopback ::1 is unusable on host {socket.gethostname()}: {exc}")


def nonblocking_pair(
    family: int = socket.AF_UNIX, kind: int = socket.SOCK_STREAM
) -> tuple[socket.socket, socket.socket]:
    """A connected non-blocking socket pair."""
    a, b = socket.socketpair(family, kind)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def spawn_coro(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """``loop.create_task`` with a type the checker keeps."""
    return loop.create_task(coro)
