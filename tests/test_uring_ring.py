"""The io_uring layer (drivers/_uring.py + its C helper) over real rings, sockets and pipes.

Nothing is mocked.  io_uring is expected to work on the Linux machines this
project runs on: if it does not, these tests fail and say why.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import resource
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from iomux.drivers import _uring as U
from iomux.errors import ForkedError, MultiplexerClosed

MS = 1_000_000  # nanoseconds


@pytest.fixture(autouse=True)
def _no_forced_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IOMUX_URING_FORCE_FAIL", raising=False)


def _require_uring() -> None:
    reason = U.probe()
    if reason is not None:
        pytest.fail(f"io_uring does not work on this machine: {reason}")


@pytest.fixture
def ring() -> Iterator[U.Ring]:
    _require_uring()
    r = U.Ring()
    yield r
    r.close()


def socketpair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def collect(ring: U.Ring, count: int, timeout: float = 5.0) -> list[tuple[int, int, int]]:
    """Enter until ``count`` completions arrived or ``timeout`` seconds passed."""
    out: list[tuple[int, int, int]] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        out += U.CQE.iter_unpack(ring.enter(1, int(left * 1e9)))
    return out


def quiet(ring: U.Ring, ms: int = 100) -> list[tuple[int, int, int]]:
    """Everything that completes within ``ms`` milliseconds."""
    return collect(ring, 1 << 30, ms / 1000)


# --- setup, probing, info ------------------------------------------------------


def test_probe_versions_and_info(ring: U.Ring) -> None:
    assert U.BUILD_ERROR is None
    assert U.probe() is None
    v = U.versions()
    assert v["kernel"] == os.uname().release
    assert v["liburing"][0].isdigit()
    info = ring.info()
    assert info["setup_flags"] == list(ring.setup_flag_names)
    assert ring.setup_attempts[-1][1] == "ok"
    assert "CQSIZE" in ring.setup_flag_names
    assert "SQPOLL" not in ring.setup_flag_names
    assert ring.cq_entries >= 4096
    features, ops = info["features"], info["ops"]
    assert isinstance(features, list) and "NODROP" in features
    assert isinstance(ops, dict) and all(ops.values())
    d = U.describe()
    assert d["available"] is True and d["reason"] is None


def test_reserved_user_data_is_refused(ring: U.Ring) -> None:
    with pytest.raises(ValueError):
        ring.nop(U.USER_DATA_MAX + 1)
    ring.nop(U.USER_DATA_MAX)
    assert collect(ring, 1) == [(U.USER_DATA_MAX, 0, 0)]


# --- polls ---------------------------------------------------------------------


def test_oneshot_poll_fires_once() -> None:
    _require_uring()
    with U.Ring() as ring:
        a, b = socketpair()
        ring.poll_add(a.fileno(), U.POLLIN, 11)
        assert quiet(ring, 50) == []
        b.send(b"x")
        [(ud, res, flags)] = collect(ring, 1)
        assert ud == 11 and res & U.POLLIN and not flags & U.F_MORE
        b.send(b"y")  # more data, still unread: a one-shot poll stays silent
        assert quiet(ring) == []
        a.close()
        b.close()


def test_multishot_poll_reports_again_on_new_data(ring: U.Ring) -> None:
    a, b = socketpair()
    ring.poll_multishot(a.fileno(), U.POLLIN, 21)
    b.send(b"1")
    [(ud, res, flags)] = collect(ring, 1)
    assert (ud, res & U.POLLIN, flags & U.F_MORE) == (21, U.POLLIN, U.F_MORE)
    assert quiet(ring) == []  # edge-like: nothing new, no report
    b.send(b"2")
    [(ud, res, flags)] = collect(ring, 1)
    assert (ud, flags & U.F_MORE) == (21, U.F_MORE)
    a.close()
    b.close()


def test_poll_update_keeps_multishot(ring: U.Ring) -> None:
    a, b = socketpair()
    ring.poll_multishot(a.fileno(), U.POLLIN, 31)
    ring.poll_update(31, 32, U.POLLIN | U.POLLRDHUP, 33)
    assert collect(ring, 1) == [(33, 0, 0)]
    for _ in range(2):  # still multishot, under its new tag
        b.send(b"z")
        [(ud, res, flags)] = collect(ring, 1)
        assert ud == 32 and res & U.POLLIN and flags & U.F_MORE
    ring.poll_remove(32, 34)
    assert sorted(collect(ring, 2)) == [(32, -errno.ECANCELED, 0), (34, 0, 0)]
    ring.poll_update(32, 35, U.POLLIN, 36, skip_success=True)  # the poll is gone
    assert collect(ring, 1) == [(36, -errno.ENOENT, 0)]
    a.close()
    b.close()


def test_poll_remove(ring: U.Ring) -> None:
    a, b = socketpair()
    ring.poll_multishot(a.fileno(), U.POLLIN, 41)
    ring.enter(0, 0)
    ring.poll_remove(41, 42)
    got = dict((ud, res) for ud, res, _ in collect(ring, 2))
    assert got == {41: -errno.ECANCELED, 42: 0}
    b.send(b"x")
    assert quiet(ring) == []
    a.close()
    b.close()


# --- cancellation ----------------------------------------------------------------


def test_cancel_by_user_data(ring: U.Ring) -> None:
    a, b = socketpair()
    ring.poll_add(a.fileno(), U.POLLIN, 51)
    ring.poll_multishot(a.fileno(), U.POLLIN, 52)
    ring.enter(0, 0)
    ring.cancel(51, 53)
    ring.cancel(52, 54)
    ring.cancel(999, 55)  # nothing has that tag
    got = {ud: (res, flags) for ud, res, flags in collect(ring, 5)}
    assert got == {
        51: (-errno.ECANCELED, 0),
        52: (-errno.ECANCELED, 0),
        53: (0, 0),
        54: (0, 0),
        55: (-errno.ENOENT, 0),
    }
    b.send(b"late")
    assert quiet(ring) == []
    a.close()
    b.close()


def test_cancel_fd_cancels_every_operation_on_it(ring: U.Ring) -> None:
    a, b = socketpair()
    c, d = socketpair()
    ring.poll_add(a.fileno(), U.POLLIN, 61)
    ring.poll_multishot(a.fileno(), U.POLLIN | U.POLLRDHUP, 62)
    ring.poll_add(a.fileno(), U.POLLPRI, 63)
    ring.poll_add(c.fileno(), U.POLLIN, 64)  # another fd: untouched
    ring.enter(0, 0)
    ring.cancel_fd(a.fileno(), 65)
    got = {ud: res for ud, res, _ in collect(ring, 4)}
    assert got == {61: -errno.ECANCELED, 62: -errno.ECANCELED, 63: -errno.ECANCELED, 65: 3}
    b.send(b"late")
    assert quiet(ring) == []
    ring.cancel_fd(a.fileno(), 66)  # nothing left: it cancels 0
    ring.cancel_fd(a.fileno(), 67, skip_success=True)  # and that is not reported
    assert quiet(ring) == [(66, 0, 0)]
    d.send(b"x")
    assert [ud for ud, _, _ in collect(ring, 1)] == [64]
    for s in (a, b, c, d):
        s.close()


def test_close_fd_through_the_ring(ring: U.Ring) -> None:
    a, b = socketpair()
    fd = os.dup(a.fileno())
    ring.close_fd(fd, 71)
    assert collect(ring, 1) == [(71, 0, 0)]
    with pytest.raises(OSError):
        os.fstat(fd)
    a.close()
    b.close()


# --- delivering many completions ---------------------------------------------------


def test_more_ready_than_the_copy_buffer_holds() -> None:
    _require_uring()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 6500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    pairs = [socketpair() for _ in range(3000)]
    try:
        with U.Ring(capacity=256) as ring:
            for i, (a, b) in enumerate(pairs):
                b.send(b"!")
                ring.poll_add(a.fileno(), U.POLLIN, i)
            assert ring.pending == 3000  # more than the SQ: enter() submits as it fills
            seen: list[int] = []
            calls = 0
            while len(seen) < 3000:
                view = ring.enter(1, 2000 * MS)
                calls += 1
                assert len(view) // U.CQE_SIZE <= 256
                if len(view) // U.CQE_SIZE == 256 and len(seen) + 256 < 3000:
                    assert ring.more
                batch = [ud for ud, res, _ in U.CQE.iter_unpack(view) if res & U.POLLIN]
                assert batch, "a wait returned without completions"
                seen += batch
            assert ring.pending == 0
            assert sorted(seen) == list(range(3000))
            assert calls >= 3000 // 256
            assert quiet(ring, 50) == []
    finally:
        for a, b in pairs:
            a.close()
            b.close()


@pytest.mark.parametrize("capacity", [4096, 7])
def test_cq_overflow_loses_nothing(capacity: int) -> None:
    _require_uring()
    pairs = [socketpair() for _ in range(200)]
    try:
        with U.Ring(8, cq_entries=16, capacity=capacity) as ring:
            assert ring.cq_entries == 16
            for _, b in pairs:
                b.send(b"!")
            for i, (a, _) in enumerate(pairs):
                ring.poll_add(a.fileno(), U.POLLIN, i)
                ring.nop(1000 + i)
            # 400 completions for a CQ of 16: most go to the overflow list.
            got = [ud for ud, _, _ in collect(ring, 400)]
            assert sorted(got) == list(range(200)) + list(range(1000, 1200))
            assert quiet(ring, 50) == []
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_raw_record_batch(ring: U.Ring) -> None:
    pipes = [os.pipe() for _ in range(50)]
    try:
        records = b"".join(
            U.RECORD.pack(U.OP_POLL_ADD, 0, 0, r, U.POLLIN, 0, 500 + i, 0, 0)
            for i, (r, _) in enumerate(pipes)
        )
        ring.queue(records)
        assert ring.pending == 50
        for _, w in pipes:
            os.write(w, b"x")
        got = sorted(ud for ud, _, _ in collect(ring, 50))
        assert got == list(range(500, 550))
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_malformed_record_is_dropped_with_an_error(ring: U.Ring) -> None:
    ring.nop(1)
    ring.queue(U.RECORD.pack(200, 0, 0, -1, 0, 0, 2, 0, 0))
    ring.nop(3)
    with pytest.raises(ValueError, match="malformed"):
        ring.enter(0, 0)
    assert ring.pending == 2
    assert sorted(ud for ud, _, _ in collect(ring, 2)) == [1, 3]


# --- waiting -------------------------------------------------------------------


@pytest.mark.parametrize("timeout_ms", [1, 10, 50])
def test_timeout_never_returns_early(ring: U.Ring, timeout_ms: int) -> None:
    a, b = socketpair()
    for queue_something in (False, True):
        if queue_something:  # submitted by the same call that waits
            ring.poll_add(a.fileno(), U.POLLIN, 81)
        start = time.monotonic()
        view = ring.enter(1, timeout_ms * MS)
        elapsed = time.monotonic() - start
        assert len(view) == 0 and ring.timed_out and not ring.woken
        assert elapsed >= timeout_ms / 1000, elapsed
        assert elapsed < timeout_ms / 1000 + 0.5
    a.close()
    b.close()


def test_zero_timeout_does_not_wait(ring: U.Ring) -> None:
    start = time.monotonic()
    for _ in range(100):
        assert len(ring.enter(1, 0)) == 0
    assert time.monotonic() - start < 0.1


def test_wake_from_another_thread_ends_an_infinite_wait(ring: U.Ring) -> None:
    ring.enter(0, 0)  # bind the ring to this thread first
    timer = threading.Timer(0.05, ring.wake)
    start = time.monotonic()
    timer.start()
    view = ring.enter(1, -1)
    elapsed = time.monotonic() - start
    timer.join()
    assert len(view) == 0 and ring.woken and not ring.timed_out
    assert 0.04 <= elapsed < 1.0
    # The wake-up was consumed: the next wait runs to its timeout.
    assert len(ring.enter(1, 30 * MS)) == 0 and ring.timed_out
    # A wake-up before the wait ends the next wait at once, repeatedly.
    for _ in range(3):
        ring.wake()
        start = time.monotonic()
        assert len(ring.enter(1, -1)) == 0 and ring.woken
        assert time.monotonic() - start < 0.5


def test_signal_handler_runs_during_a_wait(ring: U.Ring) -> None:
    class Interrupted(Exception):
        pass

    calls: list[int] = []

    def raising(signum: int, frame: object) -> None:
        raise Interrupted

    def counting(signum: int, frame: object) -> None:
        calls.append(signum)

    old = signal.signal(signal.SIGALRM, raising)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        start = time.monotonic()
        with pytest.raises(Interrupted):
            ring.enter(1, -1)
        assert time.monotonic() - start < 1.0
        # A handler that does not raise: the wait resumes for the time left.
        signal.signal(signal.SIGALRM, counting)
        a, b = socketpair()
        ring.poll_add(a.fileno(), U.POLLIN, 91)  # the call also submits
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        start = time.monotonic()
        assert len(ring.enter(1, 200 * MS)) == 0
        elapsed = time.monotonic() - start
        assert calls == [signal.SIGALRM]
        assert elapsed >= 0.2
        a.close()
        b.close()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --- networking operations -----------------------------------------------------


def test_multishot_accept(ring: U.Ring) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.setblocking(False)
        ring.accept(listener.fileno(), 101)
        ring.enter(0, 0)
        clients = [socket.create_connection(listener.getsockname()) for _ in range(5)]
        got = collect(ring, 5)
        assert len(got) == 5
        for ud, res, flags in got:
            assert ud == 101 and res >= 0 and flags & U.F_MORE
            assert not os.get_blocking(res)  # SOCK_NONBLOCK by default
            with socket.socket(fileno=res) as conn:
                conn.setblocking(True)
                conn.sendall(b"hi")
        for c in clients:
            assert c.recv(2) == b"hi"
            c.close()


def test_multishot_recv_into_buffer_ring_then_enobufs_and_rearm(ring: U.Ring) -> None:
    a, b = socketpair()
    group = ring.buffer_group(7, 8, 64)  # 512 bytes of buffers
    payload = random.Random(5).randbytes(1000)
    ring.recv(a.fileno(), group, 111)
    b.sendall(payload)

    received = bytearray()
    bids: list[int] = []
    ended = None
    deadline = time.monotonic() + 5
    while ended is None and time.monotonic() < deadline:
        for ud, res, flags in ring.completions(1, 1000 * MS):
            assert ud == 111
            if res > 0:
                assert flags & U.F_BUFFER
                bid = flags >> U.BUFFER_SHIFT
                received += group.view(bid, res)
                bids.append(bid)
            if not flags & U.F_MORE:
                ended = res
    assert ended == -errno.ENOBUFS  # the group ran dry: the multishot recv ended
    assert len(received) == 512 and sorted(bids) == list(range(8))
    assert payload.startswith(received)

    group.recycle(bids)  # at once, in one call
    ring.recv(a.fileno(), group, 112)  # re-arm
    while len(received) < len(payload) and time.monotonic() < deadline:
        for ud, res, flags in ring.completions(1, 1000 * MS):
            assert ud == 112 and res > 0 and flags & U.F_MORE
            received += group.take(flags >> U.BUFFER_SHIFT, res)  # given back at next enter
    assert bytes(received) == payload

    b.close()  # end of stream ends the receive
    [(ud, res, flags)] = collect(ring, 1)
    assert (ud, res, flags & U.F_MORE) == (112, 0, 0)
    a.close()


def test_send_with_partial_sends_arrives_intact(ring: U.Ring) -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    payload = random.Random(7).randbytes(1 << 20)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a slow reader in its own process: hash what arrives
        status = 1
        try:
            a.close()
            digest, total = hashlib.sha256(), 0
            while total < len(payload):
                chunk = b.recv(65536)
                if not chunk:
                    break
                digest.update(chunk)
                total += len(chunk)
                time.sleep(0.0005)
            os.write(w, f"{total} {digest.hexdigest()}".encode())
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    b.close()
    try:
        ring.send(a.fileno(), payload, 121)
        with pytest.raises(ValueError):  # one send per tag in flight
            ring.send(a.fileno(), b"x", 121)
        sent = partial = 0
        deadline = time.monotonic() + 60
        while sent < len(payload) and time.monotonic() < deadline:
            for ud, res, _ in ring.completions(1, 1000 * MS):
                assert ud == 121 and res > 0, res
                buf = ring.send_done(ud)
                sent += res
                if res < len(buf):
                    partial += 1
                    ring.send(a.fileno(), memoryview(buf)[res:], ud)
        assert sent == len(payload)
        assert partial >= 1
    finally:
        a.close()  # the reader sees the end of the stream even if this failed
        report = os.read(r, 4096).decode()
        os.close(r)
        os.waitpid(pid, 0)
    assert report == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}"


# --- threads, fork, close ----------------------------------------------------------


def test_ring_belongs_to_the_first_thread_that_enters_it() -> None:
    _require_uring()
    ring = U.Ring()  # created here, run in a worker: allowed
    result: list[object] = []

    def worker() -> None:
        ring.nop(1)
        result.extend(collect(ring, 1))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert result == [(1, 0, 0)]
    if "SINGLE_ISSUER" in ring.setup_flag_names:
        ring.nop(2)
        with pytest.raises(RuntimeError, match="SINGLE_ISSUER"):
            ring.enter(0, 0)  # another thread submits
    ring.close()
    with pytest.raises(MultiplexerClosed):
        ring.enter(0, 0)


def _registers_ring_fds(ring: U.Ring) -> bool:
    """Whether this kernel and ring should register the ring's fd on first enter."""
    release = tuple(int(p) for p in os.uname().release.split("-")[0].split(".")[:2])
    return (
        release >= (5, 18)
        and "SINGLE_ISSUER" in ring.setup_flag_names
        and "registered_ring" not in U.disabled_features()
    )


@pytest.mark.parametrize("disabled", [False, True], ids=["registered", "by-fd"])
def test_the_first_thread_to_enter_a_ring_registers_its_fd(
    disabled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linux 5.18+: the thread a single-issuer ring belongs to enters it by a registered
    index (no file lookup per system call); IOMUX_URING_DISABLE=registered_ring keeps
    entering by fd. The ring works the same either way."""
    if disabled:
        monkeypatch.setenv("IOMUX_URING_DISABLE", "registered_ring")
    _require_uring()
    ring = U.Ring()
    try:
        assert not ring.registered_fd  # bound (and registered) by the first enter
        ring.nop(1)
        assert collect(ring, 1) == [(1, 0, 0)]
        assert ring.registered_fd is _registers_ring_fds(ring)
        for n in range(2, 50):
            ring.nop(n)
        assert sorted(ud for ud, _, _ in collect(ring, 48)) == list(range(2, 50))
    finally:
        ring.close()
    assert not ring.registered_fd


def test_a_ring_registered_by_another_thread_never_reaches_this_threads_ring() -> None:
    """Registered indexes belong to a thread: a worker's ring and this thread's ring
    both sit at index 0 of their own thread's table. Entering the worker's ring from
    here fails as SINGLE_ISSUER says, instead of entering this thread's ring at that
    index, and closing it from here leaves this thread's registration alone."""
    _require_uring()
    mine = U.Ring()
    mine.nop(1)
    assert collect(mine, 1) == [(1, 0, 0)]
    theirs = U.Ring()
    seen: list[object] = []

    def worker() -> None:
        theirs.nop(7)
        seen.extend(collect(theirs, 1))
        seen.append(theirs.registered_fd)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    try:
        assert seen == [(7, 0, 0), _registers_ring_fds(theirs)]
        assert mine.registered_fd is _registers_ring_fds(mine)
        theirs.nop(8)
        with pytest.raises(RuntimeError, match="SINGLE_ISSUER"):
            theirs.enter(0, 0)
        theirs.close()
        mine.nop(2)
        assert collect(mine, 1) == [(2, 0, 0)]
        assert mine.registered_fd is _registers_ring_fds(mine)
    finally:
        theirs.close()
        mine.close()


def test_fork_child_gets_a_clear_error(ring: U.Ring) -> None:
    ring.nop(1)
    assert collect(ring, 1) == [(1, 0, 0)]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        status = 1
        try:
            os.close(r)
            try:
                ring.enter(0, 0)
                msg = "no error"
            except ForkedError as exc:
                msg = str(exc)
            try:
                ring.poll_add(0, U.POLLIN, 5)
                msg += " | no error"
            except ForkedError:
                msg += " | ForkedError"
            ring.close()  # drops the child's copies only
            os.write(w, msg.encode())
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    msg = os.read(r, 4096).decode()
    os.close(r)
    _, st = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(st) == 0
    assert "forked child" in msg and str(os.getpid()) in msg
    assert msg.endswith("| ForkedError")
    ring.nop(2)  # the parent's ring is untouched
    assert collect(ring, 1) == [(2, 0, 0)]


def test_close_cancels_in_flight_and_is_idempotent() -> None:
    _require_uring()
    a, b = socketpair()
    ring = U.Ring()
    group = ring.buffer_group(1, 4, 128)
    ring.poll_multishot(a.fileno(), U.POLLIN, 1)
    ring.recv(a.fileno(), group, 2)
    ring.send(b.fileno(), b"payload", 3)
    ring.enter(0, 0)
    start = time.monotonic()
    ring.close()
    ring.close()
    assert time.monotonic() - start < 1.0
    assert ring.closed
    with pytest.raises(MultiplexerClosed):
        ring.nop(1)
    a.close()
    b.close()


# --- forced failures (IOMUX_URING_FORCE_FAIL) ------------------------------------


def test_force_fail_nobuild(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOMUX_URING_FORCE_FAIL", "nobuild")
    reason = U.probe()
    assert reason is not None
    assert "apt-get install liburing-dev" in reason and "reinstall iomux" in reason
    with pytest.raises(U.RingSetupError) as info:
        U.Ring()
    assert info.value.errno == errno.ENOPKG
    assert U.describe()["available"] is False


def test_force_fail_enosys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOMUX_URING_FORCE_FAIL", "ENOSYS")
    reason = U.probe()
    assert reason is not None and "ENOSYS" in reason and "lacks io_uring" in reason
    with pytest.raises(U.RingSetupError) as info:
        U.Ring()
    assert info.value.errno == errno.ENOSYS


def test_force_fail_eperm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOMUX_URING_FORCE_FAIL", "EPERM")
    reason = U.probe()
    assert reason is not None and "EPERM" in reason
    try:
        with open("/proc/sys/kernel/io_uring_disabled") as f:
            value = f.read().strip()
    except OSError:
        value = "0"
    if value in ("1", "2"):
        assert f"kernel.io_uring_disabled = {value}" in str(reason)
    else:
        assert "seccomp" in str(reason)


def test_force_fail_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOMUX_URING_FORCE_FAIL", "disabled")
    reason = U.probe()
    assert reason is not None
    assert "kernel.io_uring_disabled = 2" in reason
    assert "sysctl -w kernel.io_uring_disabled=0" in reason
    with pytest.raises(U.RingSetupError) as info:
        U.Ring()
    assert info.value.errno == errno.EPERM


def test_force_fail_flags_falls_back_and_works(monkeypatch: pytest.MonkeyPatch) -> None:
    _require_uring()
    monkeypatch.setenv("IOMUX_URING_FORCE_FAIL", "flags")
    assert U.probe() is None
    with U.Ring() as ring:
        assert ring.setup_flag_names == ("CQSIZE", "CLAMP")
        assert [r for _, r in ring.setup_attempts[:-1]] == ["EINVAL (forced)"] * (
            len(ring.setup_attempts) - 1
        )
        assert len(ring.setup_attempts) >= 2
        a, b = socketpair()
        ring.poll_multishot(a.fileno(), U.POLLIN, 1)
        b.send(b"x")
        [(ud, res, flags)] = collect(ring, 1)
        assert ud == 1 and res & U.POLLIN and flags & U.F_MORE
        ring.cancel_fd(a.fileno(), 2)
        assert sorted(collect(ring, 2)) == [(1, -errno.ECANCELED, 0), (2, 1, 0)]
        ring.wake()
        assert len(ring.enter(1, -1)) == 0 and ring.woken
        start = time.monotonic()
        assert len(ring.enter(1, 20 * MS)) == 0 and ring.timed_out
        assert time.monotonic() - start >= 0.02
        a.close()
        b.close()


def test_force_fail_unknown_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOMUX_URING_FORCE_FAIL", "bogus")
    assert "IOMUX_URING_FORCE_FAIL" in str(U.probe())


def test_every_optional_feature_can_be_turned_off_and_tox_runs_the_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """IOMUX_URING_DISABLE naming every feature leaves none in use (``iomux info``
    says so), an unknown name is an error that lists the known ones, and tox's
    ``fallback`` environment names them all, so each fallback runs the suites."""
    _require_uring()
    monkeypatch.setenv("IOMUX_URING_DISABLE", ",".join(U.FEATURES))
    described = U.describe()
    assert described["ring_features"] == [] and described["stream_features"] == []
    monkeypatch.setenv("IOMUX_URING_DISABLE", "registered_ring,bogus")
    with pytest.raises(ValueError, match=r"bogus.*known: registered_ring"):
        U.disabled_features()
    tox_ini = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tox.ini")
    with open(tox_ini, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip().startswith("IOMUX_URING_DISABLE")]
    assert len(lines) == 1, lines
    named = {name.strip() for name in lines[0].split("=", 1)[1].split(",")}
    assert named == set(U.FEATURES)
