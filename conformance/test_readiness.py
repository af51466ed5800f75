"""Readiness: what is reported, for which fds, with which mask and data."""

from __future__ import annotations

import errno
import os
import socket

from iomux import Interest, Multiplexer, Registration, Trigger

from .helpers import drain, fd_budget, poll_until, ready_fds, socketpair

R, W = Interest.READ, Interest.WRITE


def test_nothing_ready_reports_nothing(mux: Multiplexer) -> None:
    a, b = socketpair()
    with a, b:
        mux.register(a, R)
        assert mux.poll(0) == []


def test_read_readiness_with_data(mux: Multiplexer) -> None:
    a, b = socketpair()
    with a, b:
        reg = mux.register(a, R, "payload")
        assert reg == Registration(a, a.fileno(), R, "payload", Trigger.LEVEL)
        b.send(b"x")
        ev = poll_until(mux, a.fileno())
        assert ev.fd == a.fileno()
        assert ev.events == R
        assert isinstance(ev.events, Interest)
        assert ev.data == "payload"


def test_write_readiness_is_immediate(mux: Multiplexer) -> None:
    a, b = socketpair()
    with a, b:
        mux.register(a, W, 7)
        assert ready_fds(mux.poll(0)) == {a.fileno(): int(W)}


def test_read_and_write_in_one_event(mux: Multiplexer) -> None:
    a, b = socketpair()
    with a, b:
        mux.register(a.fileno(), R | W)
        assert ready_fds(mux.poll(0)) == {a.fileno(): int(W)}
        b.send(b"x")
        poll_until(mux, a.fileno())
        assert ready_fds(mux.poll(0)) == {a.fileno(): int(R | W)}


def test_ready_reports_what_poll_does_as_plain_tuples(mux: Multiplexer) -> None:
    """ready() is poll() for an event loop: (fd, int mask, data), the same fds and masks."""
    a, b = socketpair()
    c, d = socketpair()
    with a, b, c, d:
        mux.register(a, R | W, "a")
        mux.register(c, R, ["c"])
        b.send(b"x")
        poll_until(mux, a.fileno())
        expected = {(ev.fd, int(ev.events)) for ev in mux.poll(0)}
        got = mux.ready(0)
        assert {(fd, mask) for fd, mask, _ in got} == expected == {(a.fileno(), int(R | W))}
        assert [(type(mask), data) for _, mask, data in got] == [(int, "a")]
        d.send(b"y")
        poll_until(mux, c.fileno())
        by_fd = {fd: (mask, data) for fd, mask, data in mux.ready(0)}
        assert by_fd == {a.fileno(): (3, "a"), c.fileno(): (1, ["c"])}
        mux.unregister(a)
        mux.unregister(c)
        mux.wakeup()
        assert mux.ready(5.0) == []  # the wakeup ends the wait, and is no event


def test_pipe_read_end(mux: Multiplexer) -> None:
    r, w = os.pipe()
    try:
        mux.register(r, R)
        assert mux.poll(0) == []
        os.write(w, b"abc")
        assert poll_until(mux, r).events == R
    finally:
        mux.unregister(r)
        os.close(r)
        os.close(w)


def test_only_registered_interest_is_reported(mux: Multiplexer) -> None:
    a, b = socketpair()
    with a, b:
        mux.register(a, R)
        # a is writable, but only READ was asked for.
        assert mux.poll(0) == []


def test_modify_changes_interest_and_data(mux: Multiplexer) -> None:
    a, b = socketpair()
    with a, b:
        mux.register(a, R, "old")
        assert mux.poll(0) == []
        reg = mux.modify(a, W, "new")
        assert reg.interest == W and reg.data == "new"
        assert mux[a] == reg
        events = mux.poll(0)
        assert [(e.fd, e.events, e.data) for e in events] == [(a.fileno(), W, "new")]
        mux.modify(a, R, "back")
        assert mux.poll(0) == []


def test_readiness_gone_before_the_wait_is_not_reported(mux: Multiplexer) -> None:
    """Data that arrived and was read between two waits leaves nothing to report,
    whatever the trigger: a wait reports what is ready when it runs."""
    for trigger in sorted(mux.capabilities.triggers, key=lambda t: t.value):
        a, b = socketpair()
        with a, b:
            mux.register(a, R, trigger=trigger)
            assert mux.poll(0) == []
            for _ in range(3):
                b.send(b"x")
                assert drain(a) == b"x"
                assert mux.poll(0) == [], trigger
            # Also when a driver handed its queued changes to the kernel
            # between the two (unregister() may do it at once).
            c, d = socketpair()
            with c, d:
                b.send(b"x")
                mux.register(c, R)
                mux.unregister(c)
                assert drain(a) == b"x"
                assert mux.poll(0) == [], trigger
            b.send(b"y")  # and what arrives afterwards is reported
            assert ready_fds(mux.poll(0.5)) == {a.fileno(): int(R)}, trigger
            mux.unregister(a)


def test_unregister_stops_reports(mux: Multiplexer) -> None:
    a, b = socketpair()
    with a, b:
        mux.register(a, R | W)
        b.send(b"x")
        poll_until(mux, a.fileno())
        reg = mux.unregister(a)
        assert reg.fd == a.fileno()
        assert a not in mux and len(mux) == 0
        assert mux.poll(0.02) == []


def test_lookup_len_contains(mux: Multiplexer) -> None:
    a, b = socketpair()
    with a, b:
        assert len(mux) == 0 and a not in mux and mux.get(a) is None
        reg = mux.register(a, R, "d")
        assert len(mux) == 1
        assert a in mux and a.fileno() in mux
        assert mux.get(a) == reg == mux[a.fileno()]
        assert list(mux) == [reg]
        assert b not in mux and "not a file" not in mux


def test_hangup_reports_read_then_eof(mux: Multiplexer) -> None:
    a, b = socketpair()
    with a:
        mux.register(a, R)
        b.close()
        assert poll_until(mux, a.fileno()).events == R
        assert a.recv(10) == b""


def test_hangup_reported_for_write_interest(mux: Multiplexer) -> None:
    r, w = os.pipe()
    try:
        mux.register(w, W)
        drain_pipe_capacity(w)
        assert mux.poll(0) == []
        os.close(r)
        r = -1
        # The error shows as WRITE readiness so that the next write sees EPIPE.
        assert poll_until(mux, w).events == W
        try:
            os.write(w, b"x")
        except BrokenPipeError:
            pass
        else:
            raise AssertionError("write to a pipe with no reader should fail with EPIPE")
    finally:
        mux.unregister(w)
        os.close(w)
        if r >= 0:
            os.close(r)


def drain_pipe_capacity(w: int) -> None:
    """Fill a pipe so that it is no longer writable."""
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"\0" * 65536)
    except BlockingIOError:
        pass


def test_connect_error_reported_as_write(mux: Multiplexer) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens on port now
    s = socket.socket()
    s.setblocking(False)
    with s:
        err = s.connect_ex(("127.0.0.1", port))
        assert err in (errno.EINPROGRESS, errno.ECONNREFUSED)
        mux.register(s, W)
        assert poll_until(mux, s.fileno()).events == W
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) in (0, errno.ECONNREFUSED)
        mux.unregister(s)


def test_many_fds_only_ready_reported(mux: Multiplexer) -> None:
    limit = mux.capabilities.max_fd
    count = 2000 if limit is None else (limit - 64) // 2 - 16
    with fd_budget(2 * count + 16):
        pairs = [socketpair() for _ in range(count)]
        try:
            for i, (a, _) in enumerate(pairs):
                mux.register(a, R, i)
            assert mux.poll(0) == []
            chosen = [3, count // 3, count // 2, count - 7, count - 1]
            for i in chosen:
                pairs[i][1].send(b"x")
            expected = {pairs[i][0].fileno(): int(R) for i in chosen}
            got: dict[int, int] = {}
            for _ in range(50):
                got.update(ready_fds(mux.poll(0.1)))
                if len(got) >= len(expected):
                    break
            assert got == expected
            assert sorted(e.data for e in mux.poll(0)) == sorted(chosen)
        finally:
            for a, b in pairs:
                mux.unregister(a)
                a.close()
                b.close()


def test_thousands_ready_at_once(mux: Multiplexer) -> None:
    limit = mux.capabilities.max_fd
    count = 3000 if limit is None else (limit - 64) // 2 - 16
    with fd_budget(2 * count + 16):
        pairs = [socketpair() for _ in range(count)]
        try:
            for a, b in pairs:
                mux.register(a, R)
                b.send(b"x")
            seen: set[int] = set()
            for _ in range(100):
                seen.update(ready_fds(mux.poll(0.1)))
                if len(seen) == count:
                    break
            assert seen == {a.fileno() for a, _ in pairs}
            for a, _ in pairs:
                assert drain(a) == b"x"
            assert mux.poll(0) == []
        finally:
            for a, b in pairs:
                mux.unregister(a)
                a.close()
                b.close()
