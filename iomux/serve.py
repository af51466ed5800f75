"""``python -m iomux serve {echo,http}``: demo servers on iomux's event loop.

``echo`` sends every byte back (with backpressure: it stops reading while
the peer is not taking the echo). ``http`` answers every HTTP/1.1 request
with a keep-alive "Hello, World!", parsing with httptools (``iomux[http]``);
with ``--root DIR`` it serves the files under DIR instead (GET and HEAD, with
Content-Length and keep-alive; 404 for a missing file, 403 for a path that
leaves DIR by "..", an absolute path or a symbolic link), read through
:mod:`iomux.files` (io_uring operations on io_uring) and sent with the
loop's sendfile where the connection's transport has it.
``--workers N`` forks N processes that share the port through SO_REUSEPORT.
``--io completion`` or ``--io readiness`` chooses how the loop moves the
connections' bytes (default: completion where the backend has it, e.g.
io_uring; see :mod:`iomux.reactor.loop`).
SIGTERM or SIGINT stops accepting, lets connections finish within the grace
period and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import errno
import functools
import logging
import mimetypes
import os
import signal
import socket
import stat
import sys
import urllib.parse
from typing import Any, cast

from . import files
from .reactor import Reactor
from .reactor.loop import IO_CHOICES, IO_ENV
from .reactor.server import ProtocolFactory
from .registry import Selection, choose

logger = logging.getLogger("iomux.serve")

HELLO = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nHello, World!"
HELLO_CLOSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n"
    b"Connection: close\r\n\r\nHello, World!"
)
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class EchoProtocol(asyncio.Protocol):
    """Echoes every byte; pauses reading while its writes are backed up."""

    __slots__ = ("transport",)
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        """Send the bytes back."""
        self.transport.write(data)

    def pause_writing(self) -> None:
        """The peer is not reading its echo: stop reading from it."""
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        """The echo drained: read again."""
        self.transport.resume_reading()


class HttpHelloProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive hello world over httptools."""

    def __init__(self) -> None:
        import httptools

        self._parser = httptools.HttpRequestParser(self)
        self._error = httptools.HttpParserError
        self._upgrade = httptools.HttpParserUpgrade
        self._in_request = False
        self._closing = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        """Feed the parser; it answers each complete request."""
        try:
            self._parser.feed_data(data)
        except (self._error, self._upgrade):
            assert self.transport is not None
            self.transport.write(BAD_REQUEST)
            self.transport.close()

    def on_message_begin(self) -> None:
        """A request started."""
        self._in_request = True

    def on_message_complete(self) -> None:
        """Answer; close afterwards if the client or a shutdown asks to."""
        self._in_request = False
        transport = self.transport
        assert transport is not None
        if self._closing or not self._parser.should_keep_alive():
            transport.write(HELLO_CLOSE)
            transport.close()
        else:
            transport.write(HELLO)

    def shutdown_requested(self) -> None:
        """Graceful shutdown: close now if idle, else after the current response."""
        self._closing = True
        if not self._in_request and self.transport is not None:
            self.transport.close()


#: Files up to this size are read whole and sent with their headers in one write.
SMALL_FILE = 256 * 1024
#: What one read of a larger file asks for, when the transport has no native sendfile.
FILE_CHUNK = 256 * 1024

_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
}


class PathRefused(Exception):
    """A request path that may not be served: ``status`` says why (403, 404, 400)."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


def resolve_request_path(root: str, target: bytes) -> str:
    """The file under ``root`` (a real path) that the request ``target`` names.

    Raises :class:`PathRefused`: 400 for a malformed target (not a path,
    not UTF-8, a NUL), 403 for one that leaves ``root`` textually (a ".."
    segment, an absolute path after the leading "/"). Symbolic links are
    checked on the opened file (see :class:`StaticFileProtocol`).
    """
    text = target.decode("latin-1")
    if text.startswith("/"):  # origin form: the path, then maybe ?query or #fragment
        raw = text.split("?", 1)[0].split("#", 1)[0]
    elif "://" in text:  # absolute form (to a proxy)
        try:
            raw = urllib.parse.urlsplit(text).path or "/"
        except ValueError:
            raise PathRefused(400, "malformed request target") from None
    else:
        raise PathRefused(400, "malformed request target")
    try:
        path = urllib.parse.unquote(raw, errors="strict") if "%" in raw else raw
    except UnicodeDecodeError:
        raise PathRefused(400, "the path is not UTF-8") from None
    if not path.startswith("/"):
        raise PathRefused(400, "the request target is not an absolute path")
    if "\0" in path:
        raise PathRefused(400, "NUL in the path")
    rest = path[1:]
    if rest.startswith("/"):
        raise PathRefused(403, "absolute path")
    parts = [p for p in rest.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise PathRefused(403, "the path leaves the root")
    if not parts or path.endswith("/"):
        parts.append("index.html")
    return os.path.join(root, *parts)


def _inside(root: str, real: str) -> bool:
    return real == root or real.startswith(root.rstrip("/") + "/")


class StaticFileProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive static files under ``root``, read with :mod:`iomux.files`.

    Requests are answered in order (pipelining), one at a time, by a task
    per connection.
    """

    def __init__(self, root: str) -> None:
        import httptools

        self._root = root
        self._parser = httptools.HttpRequestParser(self)
        self._error = httptools.HttpParserError
        self._upgrade = httptools.HttpParserUpgrade
        self._url = b""
        self._requests: collections.deque[tuple[bytes, bytes, bool]] = collections.deque()
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        self._writable: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    # -- protocol callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        """Feed the parser; complete requests are queued for the worker."""
        try:
            self._parser.feed_data(data)
        except (self._error, self._upgrade):
            self._requests.append((b"", b"", False))  # answered 400 in its turn
            self._start()

    def on_message_begin(self) -> None:
        """A request started."""
        self._url = b""

    def on_url(self, url: bytes) -> None:
        """Part of the request target."""
        self._url += url

    def on_message_complete(self) -> None:
        """Queue the request."""
        method = self._parser.get_method()
        self._requests.append((method, self._url, self._parser.should_keep_alive()))
        self._start()

    def pause_writing(self) -> None:
        """The transport's buffer is full: the worker waits."""
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        """The transport drained."""
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop answering."""
        self._closing = True
        self._requests.clear()
        if self._worker is not None:
            self._worker.cancel()
        self.resume_writing()

    def shutdown_requested(self) -> None:
        """Graceful shutdown: close now if idle, else after the current response."""
        self._closing = True
        if self._worker is None and self.transport is not None:
            self.transport.close()

    # -- answering -----------------------------------------------------------------------

    def _start(self) -> None:
        if self._worker is None and not self._closing:
            self._worker = asyncio.get_running_loop().create_task(self._work())

    async def _drain(self) -> None:
        while self._writable is not None:
            await self._writable

    async def _work(self) -> None:
        transport = self.transport
        assert transport is not None
        try:
            while self._requests and not transport.is_closing():
                method, url, keep_alive = self._requests.popleft()
                if not method:
                    transport.write(_response(400, b"bad request\n", keep_alive=False))
                    transport.close()
                    return
                keep_alive = keep_alive and not self._closing
                await self._answer(transport, method, url, keep_alive)
                if not keep_alive:
                    transport.close()
                    return
                await self._drain()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("error answering a request")
            transport.abort()
        finally:
            self._worker = None
        if self._closing and not transport.is_closing():
            transport.close()

    async def _answer(
        self, transport: asyncio.Transport, method: bytes, url: bytes, keep_alive: bool
    ) -> None:
        if method not in (b"GET", b"HEAD"):
            transport.write(
                _response(
                    405, b"only GET and HEAD\n", keep_alive=keep_alive, extra="Allow: GET, HEAD"
                )
            )
            return
        try:
            path = resolve_request_path(self._root, url)
            path, file = await self._open(path)
        except PathRefused as refused:
            body = f"{_REASONS[refused.status].lower()}: {refused}\n".encode()
            transport.write(_response(refused.status, body, keep_alive=keep_alive))
            return
        async with file:
            size = (await files.stat(file.fileno())).st_size
            head = method == b"HEAD"
            ctype = mimetypes.guess_type(path)[0] or "application/octet-stream"
            headers = _headers(200, size, keep_alive=keep_alive, ctype=ctype)
            if head:
                transport.write(headers)
            elif size <= SMALL_FILE:
                data = await file.read(size)
                if len(data) != size:  # it shrank: the length announced cannot be kept
                    raise OSError(errno.EIO, f"{path} changed while it was sent")
                transport.write(headers + data)
            else:
                transport.write(headers)
                await self._send_body(transport, file, size, path)

    async def _open(self, path: str) -> tuple[str, files.AsyncBinaryFile]:
        try:
            info = await files.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise PathRefused(404, "no such file") from None
        except PermissionError:
            raise PathRefused(403, "permission denied") from None
        if stat.S_ISDIR(info.st_mode):  # a directory named without its "/"
            path = os.path.join(path, "index.html")
            try:
                info = await files.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                raise PathRefused(404, "no such file") from None
        if not stat.S_ISREG(info.st_mode):
            raise PathRefused(403, "not a regular file")
        try:
            file = await files.open(path, "rb")
        except (FileNotFoundError, NotADirectoryError):
            raise PathRefused(404, "no such file") from None
        except (PermissionError, IsADirectoryError):
            raise PathRefused(403, "permission denied") from None
        try:
            real = os.readlink(f"/proc/self/fd/{file.fileno()}")
        except OSError:
            real = os.path.realpath(path)
        if not _inside(self._root, real):
            await file.close()
            raise PathRefused(403, "a symbolic link leaves the root")
        return path, file

    async def _send_body(
        self, transport: asyncio.Transport, file: files.AsyncBinaryFile, size: int, path: str
    ) -> None:
        loop = asyncio.get_running_loop()
        await self._drain()
        try:
            sent = await loop.sendfile(transport, cast(Any, file), 0, size, fallback=False)
        except (RuntimeError, NotImplementedError, asyncio.SendfileNotAvailableError):
            if transport.is_closing():
                return
            sent = 0  # this transport has no native sendfile: read and write
        while sent < size:
            chunk = await file.read(min(FILE_CHUNK, size - sent))
            if not chunk:
                raise OSError(errno.EIO, f"{path} changed while it was sent")
            await self._drain()
            if transport.is_closing():
                return
            transport.write(chunk)
            sent += len(chunk)


def _headers(status: int, length: int, *, keep_alive: bool, ctype: str, extra: str = "") -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}", f"Content-Type: {ctype}"]
    lines.append(f"Content-Length: {length}")
    if extra:
        lines.append(extra)
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _response(status: int, body: bytes, *, keep_alive: bool, extra: str = "") -> bytes:
    headers = _headers(
        status, len(body), keep_alive=keep_alive, ctype="text/plain; charset=utf-8", extra=extra
    )
    return headers + body


PROTOCOLS: dict[str, ProtocolFactory] = {"echo": EchoProtocol, "http": HttpHelloProtocol}


def add_serve_parser(subparsers: Any) -> None:
    """Add ``serve`` to the ``iomux`` command line."""
    parser = subparsers.add_parser(
        "serve",
        help="run an echo or HTTP hello-world server on iomux's event loop",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("kind", choices=sorted(PROTOCOLS), help="what to serve")
    parser.add_argument("--backend", default=None, help="backend name, list or auto")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port (0 picks one)")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    parser.add_argument("--backlog", type=int, default=1024, help="listen backlog")
    parser.add_argument(
        "--grace", type=float, default=5.0, help="seconds for connections to finish on SIGTERM"
    )
    parser.add_argument("--idle-timeout", type=float, default=None, help="close idle connections")
    parser.add_argument(
        "--root",
        default=None,
        metavar="DIR",
        help="http: serve the files under DIR instead of the hello world",
    )
    parser.add_argument(
        "--io",
        choices=IO_CHOICES,
        default=None,
        help="how connections move bytes: completion (io_uring operations), readiness, "
        f"or auto (the default, or ${IO_ENV}): completion where the backend has it",
    )
    parser.set_defaults(func=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM/SIGINT; return the exit status."""
    if args.workers < 1:
        print("iomux serve: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.kind == "http":
        try:
            import httptools  # noqa: F401
        except ImportError:
            print("iomux serve http needs httptools: pip install 'iomux[http]'", file=sys.stderr)
            return 2
    if args.root is not None:
        if args.kind != "http":
            print("iomux serve: --root applies to http only", file=sys.stderr)
            return 2
        if not os.path.isdir(args.root):
            print(f"iomux serve: --root {args.root!r} is not a directory", file=sys.stderr)
            return 2
        args.root = os.path.realpath(args.root)
        mimetypes.init()  # reads the system's tables now, not in the loop
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    selection = choose(args.backend)
    if args.workers == 1:
        return _serve(args, selection, args.port, reuse_port=False, announce=True)
    return _serve_workers(args, selection)


def _serve(
    args: argparse.Namespace,
    selection: Selection,
    port: int,
    *,
    reuse_port: bool,
    announce: bool,
    ready_fd: int = -1,
    lifeline_fd: int = -1,
) -> int:
    loop = Reactor(selection.driver, io=args.io)
    loop.selection = selection
    factory: ProtocolFactory = PROTOCOLS[args.kind]
    if getattr(args, "root", None) is not None:
        factory = functools.partial(StaticFileProtocol, args.root)
    try:
        server = loop.run_until_complete(
            loop.create_server(
                factory,
                args.host,
                port,
                backlog=args.backlog,
                reuse_port=reuse_port,
                idle_timeout=args.idle_timeout,
            )
        )
        if announce:
            where = ", ".join(_address(s) for s in server.sockets)
            workers = f" with {args.workers} workers" if args.workers > 1 else ""
            logger.info(
                "serving %s on %s%s; %s; %s I/O",
                args.kind if getattr(args, "root", None) is None else f"files of {args.root}",
                where,
                workers,
                selection.describe(),
                loop.io,
            )
            sys.stderr.flush()
        loop.install_shutdown_handlers(grace=args.grace, drain=1.0)
        if lifeline_fd >= 0:
            # EOF on the lifeline: the parent died without signalling us.
            loop.add_reader(lifeline_fd, _orphaned, loop, lifeline_fd, args.grace)
        if ready_fd >= 0:
            os.write(ready_fd, b"!")  # this worker listens: tell the parent
            os.close(ready_fd)
        loop.run_forever()
    finally:
        loop.close()
    return 0


def _serve_workers(args: argparse.Namespace, selection: Selection) -> int:
    # Hold the port with a bound (not listening) socket so port 0 and the
    # workers agree, and so it stays ours until every worker exits.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((args.host, args.port))
    port = holder.getsockname()[1]
    children: list[int] = []
    ready_r, ready_w = os.pipe()
    lifeline_r, lifeline_w = os.pipe()
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    blocked = stop_signals | {signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        for index in range(args.workers):
            pid = os.fork()
            if pid == 0:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
                holder.close()
                os.close(ready_r)
                os.close(lifeline_w)
                code = 1
                try:
                    code = _serve(
                        args,
                        selection,
                        port,
                        reuse_port=True,
                        announce=False,
                        ready_fd=ready_w,
                        lifeline_fd=lifeline_r,
                    )
                finally:
                    os._exit(code)
            children.append(pid)
            logger.debug("worker %d is pid %d", index, pid)
        os.close(ready_w)
        os.close(lifeline_r)
        ready_w = lifeline_r = -1
        # Announce only once every worker listens (EOF: a worker died first).
        started = 0
        while started < args.workers:
            got = os.read(ready_r, args.workers)
            if not got:
                break
            started += len(got)
        logger.info(
            "serving %s on %s port %d with %d workers; %s; %s I/O",
            args.kind,
            args.host,
            port,
            args.workers,
            selection.describe(),
            args.io or os.environ.get(IO_ENV) or "auto",
        )
        sys.stderr.flush()
        status = 0
        while True:
            signum = signal.sigwait(blocked)
            if signum in stop_signals:
                break
            # A worker exited on its own: stop the others and report failure.
            if any(os.waitpid(pid, os.WNOHANG)[0] for pid in children):
                logger.error("a worker exited unexpectedly; stopping the others")
                signum, status = signal.SIGTERM, 1
                break
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                _, wstatus = os.waitpid(pid, 0)
            except ChildProcessError:
                continue
            if os.waitstatus_to_exitcode(wstatus) != 0:
                status = 1
        return status
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
        holder.close()
        for fd in (ready_r, ready_w, lifeline_r, lifeline_w):
            if fd >= 0:
                os.close(fd)


def _orphaned(loop: Reactor, fd: int, grace: float) -> None:
    loop.remove_reader(fd)
    logger.warning("the parent process is gone; shutting down")
    loop.shutdown(grace, 1.0).add_done_callback(lambda _: loop.stop())


def _address(sock: socket.socket) -> str:
    addr = sock.getsockname()
    if sock.family == socket.AF_INET6:
        return f"[{addr[0]}]:{addr[1]}"
    return f"{addr[0]}:{addr[1]}"
