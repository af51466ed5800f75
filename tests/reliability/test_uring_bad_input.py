"""The boundary between Python and the C helper: wrong sizes, closed fds, huge lengths.

Every bad argument either raises a clear Python error before reaching C, or
reaches the kernel and comes back as a failed completion (-errno); the ring
keeps working afterwards. None of these tests blocks in a wait from a
thread or waits for a signal, so they can run under valgrind.
"""

from __future__ import annotations

import errno
import mmap
import socket
from collections.abc import Callable
from typing import Any, cast

import pytest

from iomux.drivers import _uring as U
from iomux.errors import MultiplexerClosed

SECOND = 1_000_000_000
_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Python 3.13+ names it


def still_works(ring: U.Ring) -> None:
    ring.nop(4242)
    assert ring.completions(1, SECOND) == [(4242, 0, 0)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"entries": 0},
        {"entries": -1},
        {"entries": 1 << 40},
        {"cq_entries": 0},
        {"cq_entries": 1 << 40},
        {"capacity": 0},
        {"capacity": 1 << 40},
    ],
)
def test_ring_sizes_out_of_range(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="entries must be in"):
        U.Ring(**kwargs)


@pytest.mark.parametrize(
    ("group_id", "count", "size", "error"),
    [
        (1, 3, 64, ValueError),  # not a power of two
        (1, 0, 64, ValueError),
        (1, 65536, 64, ValueError),
        (1, 4, 0, ValueError),
        (-1, 4, 64, ValueError),
        (70000, 4, 64, ValueError),
        (1, 4, 1 << 32, OverflowError),  # does not fit the C unsigned
        (1, 32768, 1 << 31, OSError),  # 64 TiB: the mmap is refused
    ],
)
def test_buffer_group_shapes(
    ring: U.Ring, group_id: int, count: int, size: int, error: type[Exception]
) -> None:
    with pytest.raises(error):
        ring.buffer_group(group_id, count, size)
    still_works(ring)


def test_buffer_ids_and_lengths_are_checked(ring: U.Ring) -> None:
    group = ring.buffer_group(1, 4, 64)
    for bid, length in [(-1, 10), (4, 10), (0, 65), (0, -5), (3, 1 << 40)]:
        with pytest.raises(ValueError, match=r"buffers 0\.\.3 of 64 bytes"):
            group.view(bid, length)
        with pytest.raises(ValueError, match=r"buffers 0\.\.3 of 64 bytes"):
            group.take(bid, length)
    for bad in (-1, 4, 1 << 20):
        with pytest.raises(ValueError):
            group.release(bad)
        with pytest.raises(ValueError):
            group.recycle([bad])
    assert len(group.view(3, 64)) == 64
    with pytest.raises(ValueError, match="already registered"):
        ring.buffer_group(1, 4, 64)
    still_works(ring)


@pytest.mark.parametrize(
    ("fd", "mask", "user_data"),
    [
        (1 << 31, U.POLLIN, 5),
        (-(1 << 31) - 1, U.POLLIN, 5),
        (0, -1, 5),
        (0, 1 << 32, 5),
        (0, U.POLLIN, -1),
        (0, U.POLLIN, U.USER_DATA_MAX + 1),
        (0, U.POLLIN, 1 << 64),
    ],
)
def test_operation_fields_out_of_range(ring: U.Ring, fd: int, mask: int, user_data: int) -> None:
    with pytest.raises(ValueError):
        ring.poll_add(fd, mask, user_data)
    assert ring.pending == 0
    still_works(ring)


def test_bad_fds_complete_with_ebadf(ring: U.Ring) -> None:
    s = socket.socket()
    closed = s.fileno()
    s.close()
    ring.poll_add(-1, U.POLLIN, 1)
    ring.poll_add(closed, U.POLLIN, 2)
    ring.cancel_fd(closed, 3)
    ring.close_fd(closed, 4)
    ring.accept(closed, 5)
    ring.recv(closed, 0, 6, multishot=False)
    ring.send(closed, b"data", 7)
    got = {ud: res for ud, res, _ in ring.completions(1, SECOND)}
    while len(got) < 7:
        got.update({ud: res for ud, res, _ in ring.completions(1, SECOND)})
    assert got == dict.fromkeys(range(1, 8), -errno.EBADF)
    ring.send_done(7)
    still_works(ring)


def test_raw_records_the_kernel_rejects(ring: U.Ring) -> None:
    a, b = socket.socketpair()
    try:
        with pytest.raises(ValueError, match="multiple of 40"):
            ring.queue(b"x" * 39)
        ring.queue(U.RECORD.pack(99, 0, 0, 0, 0, 0, 7, 0, 0))
        with pytest.raises(ValueError, match="malformed operation record dropped"):
            ring.enter(0, 0)
        assert ring.pending == 0
        # SEND records pointing at no memory, or at kernel addresses: EFAULT.
        for ud, addr in [(8, 0), (9, 1), (10, 0xFFFF800000000000)]:
            rec = U.RECORD.pack(
                U.OP_SEND, 0, 0, a.fileno(), socket.MSG_DONTWAIT, 1 << 20, ud, addr, 0
            )
            ring.queue(rec)
            assert ring.completions(1, SECOND) == [(ud, -errno.EFAULT, 0)]
        # A receive from a group that was never registered: ENOBUFS.
        b.send(b"x")
        ring.recv(a.fileno(), 55, 11, multishot=False)
        assert ring.completions(1, SECOND) == [(11, -errno.ENOBUFS, 0)]
        with pytest.raises(ValueError):
            ring.recv(a.fileno(), 70000, 12)
    finally:
        a.close()
        b.close()
    still_works(ring)


def test_sends_of_wrong_types_and_huge_lengths(ring: U.Ring) -> None:
    a, b = socket.socketpair()
    try:
        with pytest.raises(TypeError):
            ring.send(a.fileno(), cast(Any, "text"), 1)
        ring.send(a.fileno(), b"x", 2)
        with pytest.raises(ValueError, match="still in flight"):
            ring.send(a.fileno(), b"y", 2)
        with pytest.raises(KeyError):
            ring.send_done(3)
        # 3 GiB of address space (never touched, so it costs no memory): the
        # length is cut to 1 GiB and the non-blocking send takes what fits.
        huge = mmap.mmap(-1, 3 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE)
        ring.send(a.fileno(), huge, 4, flags=socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        got = dict((ud, res) for ud, res, _ in ring.completions(1, SECOND))
        while len(got) < 2:
            got.update((ud, res) for ud, res, _ in ring.completions(1, SECOND))
        assert got[2] == 1 and 0 < got[4] < 1 << 30
        assert ring.send_done(2) == b"x"
        assert ring.send_done(4) is huge
        huge.close()
        ring.send(a.fileno(), b"", 5)
        assert ring.completions(1, SECOND) == [(5, 0, 0)]
        ring.send_done(5)
    finally:
        a.close()
        b.close()
    still_works(ring)


@pytest.mark.parametrize(("min_complete", "timeout_ns"), [(-1, 0), (1 << 40, 0), (1, 1 << 70)])
def test_enter_arguments_out_of_range(ring: U.Ring, min_complete: int, timeout_ns: int) -> None:
    ring.nop(77)
    with pytest.raises(ValueError, match="min_complete must be 0 or 1"):
        ring.enter(min_complete, timeout_ns)
    assert ring.pending == 1  # nothing was submitted: it goes with the next call
    assert ring.completions(1, SECOND) == [(77, 0, 0)]


def test_everything_after_close_is_a_clear_error() -> None:
    ring = U.Ring()
    group = ring.buffer_group(1, 4, 64)
    ring.close()
    ring.close()  # idempotent
    calls: list[Callable[[], object]] = [
        lambda: ring.poll_add(0, U.POLLIN, 1),
        lambda: ring.enter(0, 0),
        lambda: ring.send(0, b"x", 1),
        lambda: ring.queue(b""),
        lambda: ring.buffer_group(2, 4, 64),
        lambda: ring.fileno(),
        lambda: ring.info(),
        lambda: group.release(0),
        lambda: group.recycle([0]),
    ]
    for call in calls:
        with pytest.raises(MultiplexerClosed):
            call()
    ring.wake()  # a late wake-up from another thread is harmless
    group.flush()
