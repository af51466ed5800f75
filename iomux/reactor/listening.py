"""Making listening sockets for TCP (IPv4, IPv6) and Unix servers."""

from __future__ import annotations

import os
import socket
import stat


def tcp_sockets(
    host: str | None,
    port: int,
    family: int,
    backlog: int,
    reuse_address: bool,
    reuse_port: bool,
) -> list[socket.socket]:
    """Bind and listen on every address ``host`` resolves to (all interfaces if None)."""
    infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for fam, type_, proto, _, addr in infos:
            if (fam, addr) in seen:
                continue
            seen.add((fam, addr))
            sock = socket.socket(fam, type_, proto)
            sockets.append(sock)
            if reuse_address:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if fam == socket.AF_INET6:
                # Without this, [::] would also claim the IPv4 port bound next.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(addr)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {addr!r}: {exc.strerror}") from None
            sock.setblocking(False)
            sock.listen(backlog)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise OSError(f"getaddrinfo found no address for {host!r}")
    return sockets


def unix_socket(path: str, backlog: int) -> socket.socket:
    """Bind and listen on ``path``, replacing a stale socket file there."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.setblocking(False)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
