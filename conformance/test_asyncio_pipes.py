"""asyncio compatibility: pipe transports and subprocesses."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from .aio_support import PY311, PYVER, payload, run, sha, wait_until

Loop = asyncio.AbstractEventLoop
PY = sys.executable


class ReadPipe(asyncio.Protocol):
    def __init__(self, loop: Loop) -> None:
        self.events: list[str] = []
        self.data = bytearray()
        self.transport: asyncio.ReadTransport | None = None
        self.lost: asyncio.Future[Exception | None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.ReadTransport)
        self.transport = transport
        self.events.append("connection_made")

    def data_received(self, data: bytes) -> None:
        if self.events[-1] != "data_received":
            self.events.append("data_received")
        self.data += data

    def eof_received(self) -> None:
        self.events.append("eof_received")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("connection_lost")
        self.lost.set_result(exc)


class WritePipe(asyncio.BaseProtocol):
    def __init__(self, loop: Loop) -> None:
        self.events: list[str] = []
        self.lost: asyncio.Future[Exception | None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.events.append("connection_made")

    def pause_writing(self) -> None:
        self.events.append("pause_writing")

    def resume_writing(self) -> None:
        self.events.append("resume_writing")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("connection_lost")
        self.lost.set_result(exc)


def test_read_pipe_data_then_eof(aio_loop: Loop) -> None:
    r, w = os.pipe()

    async def main() -> None:
        proto = ReadPipe(aio_loop)
        pipe = os.fdopen(r, "rb", 0)
        transport, _ = await aio_loop.connect_read_pipe(lambda: proto, pipe)
        assert transport.get_extra_info("pipe") is pipe
        if PY311:  # pipe transports have is_reading() from 3.11
            assert transport.is_reading()
        os.write(w, b"through ")
        os.write(w, b"a pipe")
        await wait_until(lambda: len(proto.data) == 14, what="the pipe's data")
        os.close(w)
        assert await proto.lost is None
        assert bytes(proto.data) == b"through a pipe"
        assert proto.events == [
            "connection_made",
            "data_received",
            "eof_received",
            "connection_lost",
        ]
        assert pipe.closed

    run(aio_loop, main())


def test_read_pipe_pause_and_resume_reading(aio_loop: Loop) -> None:
    r, w = os.pipe()

    async def main() -> None:
        proto = ReadPipe(aio_loop)
        transport, _ = await aio_loop.connect_read_pipe(lambda: proto, os.fdopen(r, "rb", 0))
        transport.pause_reading()
        if PY311:  # pipe transports have is_reading() from 3.11
            assert not transport.is_reading()
        os.write(w, b"waiting")
        await asyncio.sleep(0.05)
        assert proto.data == b""
        transport.resume_reading()
        if PY311:
            assert transport.is_reading()
        await wait_until(lambda: proto.data == b"waiting", what="the data after resume")
        transport.close()
        assert transport.is_closing()
        assert await proto.lost is None
        assert proto.events[-1] == "connection_lost" and "eof_received" not in proto.events
        os.close(w)

    run(aio_loop, main())


def test_write_pipe_data_flow_control_and_close(aio_loop: Loop) -> None:
    r, w = os.pipe()
    data = payload(1024 * 1024, seed=10)

    async def main() -> bytes:
        proto = WritePipe(aio_loop)
        transport, _ = await aio_loop.connect_write_pipe(lambda: proto, os.fdopen(w, "wb", 0))
        assert transport.can_write_eof()
        transport.write(data)  # more than the pipe holds
        assert transport.get_write_buffer_size() > 0
        assert proto.events == ["connection_made", "pause_writing"]
        reader = ReadPipe(aio_loop)
        await aio_loop.connect_read_pipe(lambda: reader, os.fdopen(r, "rb", 0))
        await wait_until(lambda: len(reader.data) == len(data), what="the whole payload")
        assert "resume_writing" in proto.events
        assert transport.get_write_buffer_size() == 0
        transport.write_eof()
        assert await proto.lost is None
        assert await reader.lost is None
        assert proto.events == [
            "connection_made",
            "pause_writing",
            "resume_writing",
            "connection_lost",
        ]
        return bytes(reader.data)

    assert sha(run(aio_loop, main())) == sha(data)


def test_write_pipe_when_the_reader_closes(aio_loop: Loop) -> None:
    """asyncio watches a write pipe for its reader going away: connection_lost(None)
    if nothing was pending, BrokenPipeError if data was."""

    async def main() -> None:
        r, w = os.pipe()
        idle = WritePipe(aio_loop)
        await aio_loop.connect_write_pipe(lambda: idle, os.fdopen(w, "wb", 0))
        os.close(r)
        assert await asyncio.wait_for(idle.lost, 5) is None
        assert idle.events == ["connection_made", "connection_lost"]

        r, w = os.pipe()
        busy = WritePipe(aio_loop)
        transport, _ = await aio_loop.connect_write_pipe(lambda: busy, os.fdopen(w, "wb", 0))
        transport.write(b"x" * 1024 * 1024)
        assert transport.get_write_buffer_size() > 0
        os.close(r)
        assert isinstance(await asyncio.wait_for(busy.lost, 5), BrokenPipeError)
        assert busy.events == ["connection_made", "pause_writing", "connection_lost"]

    run(aio_loop, main())


def test_pipe_transports_refuse_regular_files(aio_loop: Loop, tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"regular")

    async def main() -> None:
        with open(path, "rb", 0) as fh:
            with pytest.raises(ValueError):
                await aio_loop.connect_read_pipe(asyncio.Protocol, fh)
        with open(path, "wb", 0) as fh:
            with pytest.raises(ValueError):
                await aio_loop.connect_write_pipe(asyncio.Protocol, fh)

    run(aio_loop, main())


# --- subprocesses -------------------------------------------------------------------------


class Child(asyncio.SubprocessProtocol):
    def __init__(self, loop: Loop) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.output: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        self.exited: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[Exception | None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.events.append(("connection_made",))

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.events.append(("pipe_data_received", fd))
        self.output[fd] += data

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self.events.append(("pipe_connection_lost", fd, exc))

    def process_exited(self) -> None:
        self.events.append(("process_exited",))
        self.exited.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append(("connection_lost", exc))
        self.lost.set_result(exc)

    def check_order(self, fds: tuple[int, ...] = (0, 1, 2)) -> None:
        """The order asyncio guarantees (the rest varies from run to run): made
        first; each pipe's data before its pipe_connection_lost; process_exited
        once; connection_lost(None) last, after every pipe and the exit."""
        names = [e[0] for e in self.events]
        assert names[0] == "connection_made" and self.events[-1] == ("connection_lost", None)
        assert names.count("process_exited") == 1 and names.count("connection_lost") == 1
        lost = {e[1]: i for i, e in enumerate(self.events) if e[0] == "pipe_connection_lost"}
        assert sorted(lost) == sorted(fds), self.events
        assert all(e[2] is None for e in self.events if e[0] == "pipe_connection_lost")
        for i, event in enumerate(self.events):
            if event[0] == "pipe_data_received":
                assert i < lost[event[1]], f"data on fd {event[1]} after its pipe was lost"


def test_subprocess_exec_with_a_protocol(aio_loop: Loop) -> None:
    code = "import sys; d = sys.stdin.read(); sys.stdout.write(d.upper()); sys.stderr.write('err')"

    async def main() -> None:
        proto = Child(aio_loop)
        transport, _ = await aio_loop.subprocess_exec(lambda: proto, PY, "-c", code)
        assert transport.get_pid() > 0 and transport.get_returncode() is None
        stdin = transport.get_pipe_transport(0)
        assert isinstance(stdin, asyncio.WriteTransport)
        assert isinstance(transport.get_pipe_transport(1), asyncio.ReadTransport)
        stdin.write(b"shout")
        stdin.close()
        assert await proto.lost is None
        assert transport.get_returncode() == 0
        assert bytes(proto.output[1]) == b"SHOUT" and bytes(proto.output[2]) == b"err"
        proto.check_order()
        transport.close()

    run(aio_loop, main())


def test_subprocess_shell_with_a_protocol(aio_loop: Loop) -> None:
    async def main() -> None:
        proto = Child(aio_loop)
        transport, _ = await aio_loop.subprocess_shell(
            lambda: proto, "echo out; echo err >&2; exit 3", stdin=None
        )
        assert transport.get_pipe_transport(0) is None
        await proto.lost
        assert transport.get_returncode() == 3
        assert bytes(proto.output[1]) == b"out\n" and bytes(proto.output[2]) == b"err\n"
        proto.check_order(fds=(1, 2))
        transport.close()

    run(aio_loop, main())


def test_closing_the_transport_of_a_running_process_kills_it(aio_loop: Loop) -> None:
    async def main() -> None:
        proto = Child(aio_loop)
        transport, _ = await aio_loop.subprocess_exec(lambda: proto, "sleep", "30")
        await asyncio.sleep(0.01)
        transport.close()
        assert await asyncio.wait_for(asyncio.shield(proto.lost), 5) is None
        assert transport.get_returncode() == -signal.SIGKILL
        proto.check_order()

    run(aio_loop, main())


def test_create_subprocess_exec_communicate(aio_loop: Loop) -> None:
    data = payload(2 * 1024 * 1024, seed=11)

    async def main() -> None:
        proc = await asyncio.create_subprocess_exec(
            "cat",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate(data)
        assert sha(out) == sha(data) and err == b""
        assert proc.returncode == 0
        assert await proc.wait() == 0

    run(aio_loop, main())


def test_create_subprocess_stdin_writing_and_streamed_output(aio_loop: Loop) -> None:
    code = "import sys\nfor line in sys.stdin:\n    print(len(line.strip()), flush=True)"

    async def main() -> None:
        proc = await asyncio.create_subprocess_exec(
            PY, "-c", code, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        assert proc.stdin is not None and proc.stdout is not None
        for word in (b"a", b"bb", b"ccc"):
            proc.stdin.write(word + b"\n")
            await proc.stdin.drain()
            assert await proc.stdout.readline() == str(len(word)).encode() + b"\n"
        assert proc.returncode is None
        proc.stdin.close()
        assert await proc.stdout.read() == b""
        assert await proc.wait() == 0 and proc.returncode == 0

    run(aio_loop, main())


def test_create_subprocess_shell_with_merged_stderr(aio_loop: Loop) -> None:
    async def main() -> None:
        proc = await asyncio.create_subprocess_shell(
            "echo out; echo err >&2; exit 5",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, err = await proc.communicate()
        assert sorted(out.split()) == [b"err", b"out"] and err is None
        assert proc.returncode == 5

    run(aio_loop, main())


def test_terminate_kill_and_send_signal(aio_loop: Loop) -> None:
    code = (
        "import signal, sys\n"
        "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(7))\n"
        "print('ready', flush=True)\n"
        "signal.pause()\n"
    )

    async def main() -> None:
        sleeper = await asyncio.create_subprocess_exec("sleep", "30")
        sleeper.terminate()
        assert await sleeper.wait() == -signal.SIGTERM
        sleeper = await asyncio.create_subprocess_exec("sleep", "30")
        sleeper.kill()
        assert await sleeper.wait() == -signal.SIGKILL
        handler = await asyncio.create_subprocess_exec(
            PY, "-c", code, stdout=asyncio.subprocess.PIPE
        )
        assert handler.stdout is not None
        assert await handler.stdout.readline() == b"ready\n"
        handler.send_signal(signal.SIGUSR1)
        assert await handler.wait() == 7

    run(aio_loop, main())


def test_wait_and_a_grandchild_holding_the_pipes(aio_loop: Loop) -> None:
    """The child exits at once; its own child keeps stdout open until stdin closes.
    Before 3.11 wait() returns at the child's exit; from 3.11 it also waits for
    the pipes to close."""
    code = "import os, sys\nif os.fork() == 0:\n    sys.stdin.read()\n    os._exit(0)\n"

    async def main() -> None:
        proc = await asyncio.create_subprocess_exec(
            PY, "-c", code, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        assert proc.stdin is not None and proc.stdout is not None
        waiting = aio_loop.create_task(proc.wait())
        if PY311:
            done, _ = await asyncio.wait({waiting}, timeout=0.3)
            assert not done, f"wait() returned with the pipes still open ({PYVER})"
        else:
            done, _ = await asyncio.wait({waiting}, timeout=5)
            assert done and waiting.result() == 0, f"wait() did not return at exit ({PYVER})"
        proc.stdin.close()  # the grandchild exits and the pipes close
        assert await proc.stdout.read() == b""
        assert await asyncio.wait_for(waiting, 5) == 0

    run(aio_loop, main())


def test_many_concurrent_subprocesses(aio_loop: Loop) -> None:
    async def one(i: int) -> tuple[int, bytes]:
        proc = await asyncio.create_subprocess_exec(
            PY, "-c", f"print({i}); raise SystemExit({i % 4})", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        return proc.returncode or 0, out

    async def main() -> None:
        results = await asyncio.gather(*(one(i) for i in range(8)))
        assert results == [(i % 4, f"{i}\n".encode()) for i in range(8)]

    run(aio_loop, main(), timeout=20)
