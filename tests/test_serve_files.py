"""``python -m iomux serve http --root DIR``: static files over real sockets."""

from __future__ import annotations

import hashlib
import random
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import iomux

pytest.importorskip("httptools", reason="the http server needs the iomux[http] extra")

AVAILABLE = [b.name for b in iomux.backends() if b.available]
BACKENDS = [b for b in ("io_uring", "epoll") if b in AVAILABLE]
BIG = 5 * 1024 * 1024 + 17


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("serve")
    top = base / "www"
    (top / "sub").mkdir(parents=True)
    (top / "index.html").write_text("<p>index</p>\n")
    (top / "hello.txt").write_text("hello, files\n")
    (top / "sub" / "index.html").write_text("sub index\n")
    (top / "sub" / "a.json").write_text('{"a": 1}\n')
    (top / "big.bin").write_bytes(random.Random(1).randbytes(BIG))
    (top / "empty").write_bytes(b"")
    (base / "secret.txt").write_text("outside\n")
    (top / "inside-link").symlink_to(top / "hello.txt")
    (top / "outside-link").symlink_to(base / "secret.txt")
    (top / "outside-dir").symlink_to(base)
    return top


@contextmanager
def serving(root: Path, backend: str) -> Iterator[int]:
    command = [sys.executable, "-m", "iomux", "serve", "http", "--root", str(root)]
    command += ["--port", "0", "--backend", backend]
    proc = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert match, line
        assert f"files of {root}" in line
        yield int(match.group(1))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()


class Client:
    """HTTP/1.1 over one connection; responses framed by Content-Length."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.pending = b""

    def send(self, *targets: str, method: str = "GET", close: bool = False) -> None:
        extra = "Connection: close\r\n" if close else ""
        self.sock.sendall(
            b"".join(f"{method} {t} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode() for t in targets)
        )

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.pending += chunk

    def response(self, head: bool = False) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.pending:
            self._fill()
        raw, _, self.pending = self.pending.partition(b"\r\n\r\n")
        status_line, *lines = raw.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
        length = 0 if head else int(headers["content-length"])
        while len(self.pending) < length:
            self._fill()
        body, self.pending = self.pending[:length], self.pending[length:]
        return int(status_line.split()[1]), headers, body

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_files_keep_alive_and_a_big_file(root: Path, backend: str) -> None:
    with serving(root, backend) as port:
        c = Client(port)
        c.send("/hello.txt")
        status, headers, body = c.response()
        assert status == 200 and body == b"hello, files\n"
        assert headers["content-length"] == str(len(body))
        assert headers["content-type"].startswith("text/plain")
        c.send("/", "/sub/", "/sub", "/sub/a.json", "/empty", "/inside-link?x=1#f")  # pipelined
        answers = [c.response() for _ in range(6)]
        assert [a[0] for a in answers] == [200] * 6
        assert [a[2] for a in answers] == [
            b"<p>index</p>\n",
            b"sub index\n",
            b"sub index\n",
            b'{"a": 1}\n',
            b"",
            b"hello, files\n",
        ]
        assert answers[3][1]["content-type"] == "application/json"
        c.send("/big.bin")
        status, headers, body = c.response()
        assert status == 200 and int(headers["content-length"]) == BIG
        big = (root / "big.bin").read_bytes()
        assert hashlib.sha256(body).digest() == hashlib.sha256(big).digest()
        c.send("/big.bin", method="HEAD")
        status, headers, _ = c.response(head=True)
        assert status == 200 and int(headers["content-length"]) == BIG
        c.send("/hello.txt")  # the same connection still answers after HEAD
        assert c.response()[2] == b"hello, files\n"
        c.send("/hello.txt", close=True)
        status, headers, body = c.response()
        assert headers.get("connection") == "close" and body == b"hello, files\n"
        assert c.closed_by_server()
        c.close()


@pytest.mark.parametrize("backend", BACKENDS[:1])
def test_refused_paths(root: Path, backend: str) -> None:
    refused = {
        "/../secret.txt": 403,
        "/sub/../../secret.txt": 403,
        "/%2e%2e/secret.txt": 403,
        "/sub%2F..%2F..%2Fsecret.txt": 403,
        "//etc/passwd": 403,
        "/outside-link": 403,
        "/outside-dir/secret.txt": 403,
        "/missing.txt": 404,
        "/sub/missing/deeper": 404,
        "/hello.txt/below": 404,
    }
    with serving(root, backend) as port:
        c = Client(port)
        for target, expected in refused.items():
            c.send(target)
            status, headers, body = c.response()
            assert status == expected, (target, status, body)
            assert int(headers["content-length"]) == len(body)
            assert b"outside" not in body
        c.send("/hello.txt", method="POST")
        status, headers, _ = c.response()
        assert status == 405 and headers["allow"] == "GET, HEAD"
        c.send("/hello.txt")  # keep-alive survives the refusals
        assert c.response()[0] == 200
        c.close()
        bad = Client(port)
        bad.sock.sendall(b"NOT HTTP\r\n\r\n")
        assert bad.response()[0] == 400
        bad.close()


def test_root_must_be_a_directory(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "iomux", "serve", "http", "--root", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2 and "not a directory" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "iomux", "serve", "echo", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2 and "http only" in proc.stderr


def test_resolve_request_path() -> None:
    from iomux.serve import PathRefused, resolve_request_path

    assert resolve_request_path("/srv", b"/a/b.txt?q") == "/srv/a/b.txt"
    assert resolve_request_path("/srv", b"/") == "/srv/index.html"
    assert resolve_request_path("/srv", b"/d/") == "/srv/d/index.html"
    assert resolve_request_path("/srv", b"/a%20b") == "/srv/a b"
    assert resolve_request_path("/srv", b"http://host/x") == "/srv/x"
    for target, status in [
        (b"/..", 403),
        (b"/a/%2e%2E/..", 403),
        (b"//abs", 403),
        (b"/%00", 400),
        (b"/%ff", 400),
        (b"*", 400),
    ]:
        with pytest.raises(PathRefused) as refused:
            resolve_request_path("/srv", target)
        assert refused.value.status == status, target
