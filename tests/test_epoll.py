"""epoll's own behaviour beyond the shared contract."""

from __future__ import annotations

import errno
import select
import socket
import tempfile

import pytest

from iomux import Interest, UnwatchableFile
from iomux.drivers.epoll import EpollDriver


def test_regular_file_is_refused_with_reason() -> None:
    with EpollDriver() as mux, tempfile.TemporaryFile() as f:
        with pytest.raises(UnwatchableFile) as info:
            mux.register(f, Interest.READ)
        assert info.value.errno == errno.EPERM
        assert "epoll cannot watch regular files" in str(info.value)
        assert f not in mux


def test_fileno_is_pollable_epoll_fd() -> None:
    with EpollDriver() as mux:
        a, b = socket.socketpair()
        with a, b:
            mux.register(a, Interest.READ)
            outer = select.poll()
            outer.register(mux.fileno(), select.POLLIN)
            assert outer.poll(0) == []
            b.send(b"x")
            assert outer.poll(1000) == [(mux.fileno(), select.POLLIN)]


def test_more_ready_than_default_maxevents() -> None:
    # CPython's epoll.poll() returns at most FD_SETSIZE - 1 events by default.
    with EpollDriver() as mux:
        pairs = [socket.socketpair() for _ in range(1500)]
        try:
            for a, _ in pairs:
                mux.register(a, Interest.WRITE)
            assert len(mux.poll(0)) == 1500
        finally:
            for a, b in pairs:
                a.close()
                b.close()
