"""``python -m iomux serve {echo,http}``: demo servers on iomux's event loop.

``echo`` sends every byte back (with backpressure: it stops reading while
the peer is not taking the echo). ``http`` answers every HTTP/1.1 request
with a keep-alive "Hello, World!", parsing with httptools (``iomux[http]``).
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
import logging
import os
import signal
import socket
import sys
from typing import Any

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
    try:
        server = loop.run_until_complete(
            loop.create_server(
                PROTOCOLS[args.kind],
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
                args.kind,
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
