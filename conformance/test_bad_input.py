"""Bad input gets the documented exception and leaves nothing half-registered."""

from __future__ import annotations

import errno
import os
import socket
import tempfile

import pytest

from iomux import (
    FdOutOfRange,
    Interest,
    InvalidFileObject,
    Multiplexer,
    Trigger,
    UnsupportedTrigger,
    UnwatchableFile,
)

from .helpers import poll_until, ready_fds, socketpair

R, W = Interest.READ, Interest.WRITE


def test_register_twice_is_keyerror(mux: Multiplexer) -> None:
    a, b = socketpair()
    with a, b:
        reg = mux.register(a, R, "first")
        with pytest.raises(KeyError):
            mux.register(a, W, "second")
        with pytest.raises(KeyError):
            mux.register(a.fileno(), W)
        assert mux[a] == reg


def test_unknown_fd_is_keyerror(mux: Multiplexer) -> None:
    a, b = socketpair()
    with a, b:
        with pytest.raises(KeyError):
            mux.modify(a, R)
        with pytest.raises(KeyError):
            mux.unregister(a)
        with pytest.raises(KeyError):
            mux[a]
        assert len(mux) == 0


@pytest.mark.parametrize("bad", [-1, -100])
def test_negative_fd_is_valueerror(mux: Multiplexer, bad: int) -> None:
    with pytest.raises(ValueError):
        mux.register(bad, R)
    assert len(mux) == 0


@pytest.mark.parametrize("bad", [object(), "3", 3.0, None, True])
def test_not_a_file_is_typeerror(mux: Multiplexer, bad: object) -> None:
    with pytest.raises(InvalidFileObject) as info:
        mux.register(bad, R)  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    assert len(mux) == 0


@pytest.mark.parametrize("interest", [0, 4, 8, R | 4, -1])
def test_bad_interest_is_valueerror(mux: Multiplexer, interest: int) -> None:
    a, b = socketpair()
    with a, b:
        with pytest.raises(ValueError, match="interest"):
            mux.register(a, interest)
        assert a not in mux


@pytest.mark.parametrize("interest", ["r", None, 1.0])
def test_interest_of_wrong_type_is_typeerror(mux: Multiplexer, interest: object) -> None:
    a, b = socketpair()
    with a, b:
        with pytest.raises(TypeError):
            mux.register(a, interest)  # type: ignore[arg-type]
        assert a not in mux


def test_trigger_of_wrong_type_is_typeerror(mux: Multiplexer) -> None:
    a, b = socketpair()
    with a, b:
        with pytest.raises(TypeError):
            mux.register(a, R, trigger="edge")  # type: ignore[arg-type]
        assert a not in mux


def test_fd_not_open_is_ebadf(mux: Multiplexer) -> None:
    a, b = socketpair()
    fd = a.fileno()
    a.close()
    b.close()
    with pytest.raises(OSError) as info:
        mux.register(fd, R)
    assert info.value.errno == errno.EBADF
    assert fd not in mux and len(mux) == 0


def test_fd_beyond_driver_limit(mux: Multiplexer) -> None:
    limit = mux.capabilities.max_fd
    if limit is None:
        pytest.skip(f"{mux.name} declares no capability max_fd (no fd limit of its own)")
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= limit:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} is too low to test max_fd={limit}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, limit + 1), hard))
    a, b = socketpair()
    high = os.dup2(a.fileno(), limit + 0)
    try:
        with pytest.raises(FdOutOfRange) as info:
            mux.register(high, R)
        assert str(limit) in str(info.value)
        assert isinstance(info.value, ValueError)
        assert high not in mux
    finally:
        os.close(high)
        a.close()
        b.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_regular_file_is_refused_clearly_or_always_ready(mux: Multiplexer) -> None:
    with tempfile.TemporaryFile() as f:
        try:
            mux.register(f, R)
        except UnwatchableFile as exc:
            assert exc.errno == errno.EPERM
            assert "regular file" in str(exc)
            assert f not in mux
        else:
            # poll(2) and select(2) report regular files as always ready.
            assert ready_fds(mux.poll(0)) == {f.fileno(): int(R)}
            mux.unregister(f)


def test_failed_modify_keeps_registration(mux: Multiplexer) -> None:
    a, b = socketpair()
    with a, b:
        reg = mux.register(a, R, "keep")
        with pytest.raises(ValueError):
            mux.modify(a, 0)
        with pytest.raises(TypeError):
            mux.modify(a, R, trigger="level")  # type: ignore[arg-type]
        for trigger in Trigger:
            if trigger not in mux.capabilities.triggers:
                with pytest.raises(UnsupportedTrigger):
                    mux.modify(a, W, "changed", trigger=trigger)
        assert mux[a] == reg
        b.send(b"x")
        ev = poll_until(mux, a.fileno())
        assert (ev.events, ev.data) == (R, "keep")


def test_unregister_after_close_of_fd(mux: Multiplexer) -> None:
    a, b = socketpair()
    fd = a.fileno()
    mux.register(a, R)
    a.close()
    assert mux.unregister(a).fd == fd  # found by identity although fileno() is -1
    b.close()
    assert len(mux) == 0
    c, d = socketpair()
    e, f = socketpair()
    with c, d, e, f:
        mux.register(c.fileno(), R)
        cfd = c.fileno()
        c.close()
        assert mux.unregister(cfd).fd == cfd


def test_fd_number_reused_after_unregister(mux: Multiplexer) -> None:
    a, b = socketpair()
    fd = a.fileno()
    mux.register(a, R, "old")
    b.send(b"stale")
    poll_until(mux, fd)
    mux.unregister(a)
    a.close()
    b.close()
    c, d = socketpair()
    with c, d:
        if c.fileno() != fd:
            os.dup2(c.fileno(), fd)
            c.close()
            c = socket.socket(fileno=fd)
        assert c.fileno() == fd
        mux.register(c, R, "new")
        assert mux.poll(0.02) == []  # nothing stale from the old file
        d.send(b"fresh")
        ev = poll_until(mux, fd)
        assert ev.data == "new"
        mux.unregister(c)


def test_dup_fds_are_independent(mux: Multiplexer) -> None:
    a, b = socketpair()
    with a, b:
        dup = os.dup(a.fileno())
        try:
            mux.register(a, R, "orig")
            mux.register(dup, R, "dup")
            b.send(b"x")
            got = {}
            for _ in range(20):
                got.update({e.fd: e.data for e in mux.poll(0.1)})
                if len(got) == 2:
                    break
            assert got == {a.fileno(): "orig", dup: "dup"}
            mux.unregister(dup)
        finally:
            os.close(dup)
        assert ready_fds(mux.poll(0.1)) == {a.fileno(): int(R)}


@pytest.mark.parametrize("interest", [R, W, R | W], ids=["read", "write", "both"])
def test_fd_closed_while_registered_never_breaks_a_wait(mux: Multiplexer, interest: int) -> None:
    """Closing a registered fd without unregistering it must not make poll() fail.

    Drivers differ only in whether the closed fd is reported (select and
    poll report it as ready for what was registered, so its owner's next
    call sees EBADF; epoll and io_uring forget it); every other fd goes on
    being reported, and the closed one can still be unregistered.
    """
    a, b = socketpair()
    c, d = socketpair()
    with b, c, d:
        fd = a.fileno()
        mux.register(a, interest, "closed")
        mux.register(c, R, "alive")
        a.close()
        for _ in range(3):
            events = mux.poll(0.02)
            assert all(e.fd in (fd, c.fileno()) for e in events), events
            for e in events:
                if e.fd == fd:
                    assert e.data == "closed" and e.events & ~interest == 0, e
        d.send(b"x")
        assert poll_until(mux, c.fileno()).data == "alive"
        assert mux.unregister(a).fd == fd
        assert ready_fds(mux.poll(0)) == {c.fileno(): int(R)}
        assert len(mux) == 1
