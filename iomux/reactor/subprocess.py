"""Subprocesses (``subprocess_exec``, ``subprocess_shell``), as asyncio's.

The child is started with :class:`subprocess.Popen`; its pipes become the
loop's pipe transports, and its exit is watched through a pidfd (Linux
5.3+) that the loop reads like any fd, so no thread and no SIGCHLD handler
is needed. The protocol sees asyncio's order: ``connection_made``, then
``pipe_data_received``/``pipe_connection_lost`` per pipe and
``process_exited``, and ``connection_lost`` once the process has exited and
every pipe is closed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess as std_subprocess
import sys
import threading
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any

from .base import aio_logger

# asyncio 3.11+ wakes wait() only once the pipes are closed too.
_WAIT_FOR_PIPES = sys.version_info >= (3, 11)


async def start(
    loop: asyncio.AbstractEventLoop,
    protocol_factory: Callable[[], asyncio.SubprocessProtocol],
    args: Any,
    shell: bool,
    stdin: Any,
    stdout: Any,
    stderr: Any,
    kwargs: dict[str, Any],
) -> tuple[asyncio.SubprocessTransport, asyncio.SubprocessProtocol]:
    """Start the child and connect its pipes; return ``(transport, protocol)``."""
    protocol = protocol_factory()
    waiter = loop.create_future()
    transport = SubprocessTransport(
        loop, protocol, args, shell, stdin, stdout, stderr, waiter, kwargs
    )
    try:
        await waiter
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException:
        transport.close()
        await transport._wait()
        raise
    return transport, protocol


class _PipeProtocol(asyncio.Protocol):
    """Forwards one pipe's events to its subprocess transport."""

    def __init__(self, owner: SubprocessTransport, fd: int) -> None:
        self.owner: SubprocessTransport | None = owner
        self.fd = fd
        self.pipe: Any = None
        self.disconnected = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.pipe = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.disconnected = True
        owner, self.owner = self.owner, None
        if owner is not None:
            owner._pipe_connection_lost(self.fd, exc)

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner._protocol.pause_writing()

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner._protocol.resume_writing()

    def data_received(self, data: bytes) -> None:
        if self.owner is not None:
            self.owner._call(self.owner._protocol.pipe_data_received, self.fd, data)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} fd={self.fd} pipe={self.pipe!r}>"


class SubprocessTransport(asyncio.SubprocessTransport):
    """A child process and its pipes."""

    _extra: dict[str, Any]  # asyncio.BaseTransport's (typeshed does not declare it)

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol: asyncio.SubprocessProtocol,
        args: Any,
        shell: bool,
        stdin: Any,
        stdout: Any,
        stderr: Any,
        waiter: asyncio.Future[Any],
        kwargs: dict[str, Any],
    ) -> None:
        super().__init__()
        self._loop = loop
        self._protocol: Any = protocol
        self._closed = False
        self._proc: std_subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._returncode: int | None = None
        self._exit_waiters: list[asyncio.Future[int]] | None = []
        self._pending_calls: deque[tuple[Callable[..., object], tuple[Any, ...]]] | None = deque()
        self._pipes: dict[int, _PipeProtocol | None] = {}
        self._finished = False
        self._pidfd = -1
        for fd, spec in ((0, stdin), (1, stdout), (2, stderr)):
            if spec == std_subprocess.PIPE:
                self._pipes[fd] = None
        try:
            self._proc = std_subprocess.Popen(
                args,
                shell=shell,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                universal_newlines=False,
                bufsize=0,
                **kwargs,
            )
        except BaseException:
            self.close()
            raise
        self._pid = self._proc.pid
        self._extra["subprocess"] = self._proc
        if loop.get_debug():
            program = args if isinstance(args, (bytes, str)) else args[0]
            aio_logger.debug("process %r created: pid %s", program, self._pid)
        self._watch_exit()
        loop.create_task(self._connect_pipes(waiter))

    # -- the child's exit -----------------------------------------------------------

    def _watch_exit(self) -> None:
        pid = self._pid
        assert pid is not None
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError:
            # No pidfd (old kernel, seccomp): wait in a thread instead.
            threading.Thread(
                target=self._wait_in_thread, name=f"iomux-waitpid-{pid}", daemon=True
            ).start()
            return
        self._loop.add_reader(self._pidfd, self._on_pidfd)

    def _on_pidfd(self) -> None:
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        self._reap()

    def _reap(self) -> None:
        pid = self._pid
        assert pid is not None
        try:
            got, status = os.waitpid(pid, 0)
        except ChildProcessError:
            if self._proc is not None and self._proc.returncode is not None:
                self._process_exited(self._proc.returncode)  # Popen reaped it (poll())
                return
            aio_logger.warning(
                "child process pid %d exit status already read: will report returncode 255", pid
            )
            returncode = 255
        else:
            returncode = os.waitstatus_to_exitcode(status) if got else 255
        self._process_exited(returncode)

    def _wait_in_thread(self) -> None:
        pid = self._pid
        assert pid is not None
        try:
            _, status = os.waitpid(pid, 0)
            returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            returncode = 255
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._process_exited, returncode)

    def _process_exited(self, returncode: int) -> None:
        if self._returncode is not None:
            return
        if self._loop.get_debug():
            aio_logger.info("%r exited with return code %r", self, returncode)
        self._returncode = returncode
        if self._proc is not None and self._proc.returncode is None:
            self._proc.returncode = returncode
        self._call(self._protocol.process_exited)
        if not _WAIT_FOR_PIPES:
            self._wake_waiters()
        self._try_finish()

    def _wake_waiters(self) -> None:
        waiters, self._exit_waiters = self._exit_waiters, None
        for waiter in waiters or ():
            if not waiter.cancelled():
                waiter.set_result(self._returncode)  # type: ignore[arg-type]

    async def _wait(self) -> int:
        """Wait until the process exits (and, Python 3.11+, its pipes close); its code."""
        if self._returncode is not None and self._exit_waiters is None:
            return self._returncode
        if self._returncode is not None and not _WAIT_FOR_PIPES:
            return self._returncode
        waiter: asyncio.Future[int] = self._loop.create_future()
        assert self._exit_waiters is not None
        self._exit_waiters.append(waiter)
        return await waiter

    # -- the pipes --------------------------------------------------------------------

    async def _connect_pipes(self, waiter: asyncio.Future[Any]) -> None:
        try:
            proc, loop = self._proc, self._loop
            assert proc is not None
            if proc.stdin is not None:
                _, pipe = await loop.connect_write_pipe(lambda: _PipeProtocol(self, 0), proc.stdin)
                self._pipes[0] = pipe
            if proc.stdout is not None:
                _, pipe = await loop.connect_read_pipe(lambda: _PipeProtocol(self, 1), proc.stdout)
                self._pipes[1] = pipe
            if proc.stderr is not None:
                _, pipe = await loop.connect_read_pipe(lambda: _PipeProtocol(self, 2), proc.stderr)
                self._pipes[2] = pipe
            loop.call_soon(self._protocol.connection_made, self)
            pending, self._pending_calls = self._pending_calls, None
            for callback, data in pending or ():
                loop.call_soon(callback, *data)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            if not waiter.cancelled():
                waiter.set_exception(exc)
        else:
            if not waiter.cancelled():
                waiter.set_result(None)

    def _call(self, callback: Callable[..., object], *data: Any) -> None:
        if self._pending_calls is not None:
            self._pending_calls.append((callback, data))
        else:
            self._loop.call_soon(callback, *data)

    def _pipe_connection_lost(self, fd: int, exc: BaseException | None) -> None:
        self._call(self._protocol.pipe_connection_lost, fd, exc)
        self._try_finish()

    def _try_finish(self) -> None:
        if self._finished or self._returncode is None:
            return
        if all(p is not None and p.disconnected for p in self._pipes.values()):
            self._finished = True
            self._call(self._call_connection_lost, None)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._wake_waiters()
            self._proc = None
            self._protocol = None

    # -- SubprocessTransport ----------------------------------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Hand the process to another protocol."""
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        """The current protocol."""
        return self._protocol  # type: ignore[no-any-return]

    def is_closing(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Close the pipes, and kill the child if it still runs."""
        if self._closed:
            return
        self._closed = True
        for proto in self._pipes.values():
            if proto is not None:
                proto.pipe.close()
        proc = self._proc
        if proc is not None and self._returncode is None and proc.poll() is None:
            if self._loop.get_debug():
                aio_logger.warning("Close running child process: kill %r", self)
            try:
                proc.kill()
            except (ProcessLookupError, PermissionError):
                pass

    def get_pid(self) -> int:
        """The child's process id."""
        return self._pid  # type: ignore[return-value]

    def get_returncode(self) -> int | None:
        """The exit code, or None while the child runs."""
        return self._returncode

    def get_pipe_transport(self, fd: int) -> Any:
        """The transport of the child's fd 0, 1 or 2, or None if it is not a pipe."""
        proto = self._pipes.get(fd)
        return proto.pipe if proto is not None else None

    def _check_proc(self) -> None:
        if self._proc is None:
            raise ProcessLookupError()

    def send_signal(self, signal: int) -> None:
        """Send ``signal`` to the child (nothing if it is gone already)."""
        self._check_proc()
        try:
            os.kill(self._pid, signal)  # type: ignore[arg-type]
        except ProcessLookupError:
            pass

    def terminate(self) -> None:
        """Send SIGTERM."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Send SIGKILL."""
        self.send_signal(signal.SIGKILL)

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if not getattr(self, "_closed", True):
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            self.close()

    def __repr__(self) -> str:
        info = [type(self).__name__]
        if self._closed:
            info.append("closed")
        if self._pid is not None:
            info.append(f"pid={self._pid}")
        if self._returncode is not None:
            info.append(f"returncode={self._returncode}")
        elif self._pid is not None:
            info.append("running")
        return "<{}>".format(" ".join(info))
