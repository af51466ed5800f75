"""Level, edge and one-shot triggering."""

from __future__ import annotations

from iomux import Interest, Multiplexer, Trigger, UnsupportedTrigger

from .helpers import drain, poll_until, ready_fds, socketpair
from .plugin import require

R, W = Interest.READ, Interest.WRITE


def test_level_reports_while_ready(mux: Multiplexer) -> None:
    a, b = socketpair()
    with a, b:
        mux.register(a, R, trigger=Trigger.LEVEL)
        b.send(b"abc")
        poll_until(mux, a.fileno())
        for _ in range(3):
            assert ready_fds(mux.poll(0)) == {a.fileno(): int(R)}
        assert a.recv(1) == b"a"
        assert ready_fds(mux.poll(0)) == {a.fileno(): int(R)}
        drain(a)
        assert mux.poll(0) == []
        assert mux.poll(0) == []
        b.send(b"again")  # ready anew after being drained: reported again
        assert poll_until(mux, a.fileno()).events == R
        assert ready_fds(mux.poll(0)) == {a.fileno(): int(R)}


def test_edge_reports_once_per_new_readiness(mux: Multiplexer) -> None:
    require(mux, Trigger.EDGE)
    a, b = socketpair()
    with a, b:
        mux.register(a, R, trigger=Trigger.EDGE)
        b.send(b"abc")
        assert poll_until(mux, a.fileno()).events == R
        # Still readable, but no new readiness: not reported again.
        assert mux.poll(0) == []
        assert mux.poll(0.02) == []
        drain(a)
        b.send(b"more")
        assert poll_until(mux, a.fileno()).events == R
        assert mux.poll(0) == []


def test_edge_write(mux: Multiplexer) -> None:
    require(mux, Trigger.EDGE)
    a, b = socketpair()
    with a, b:
        mux.register(a, W, trigger=Trigger.EDGE)
        assert poll_until(mux, a.fileno()).events == W
        assert mux.poll(0) == []


def test_oneshot_reports_once_until_rearmed(mux: Multiplexer) -> None:
    require(mux, Trigger.ONESHOT)
    a, b = socketpair()
    with a, b:
        mux.register(a, R, "d", trigger=Trigger.ONESHOT)
        b.send(b"x")
        assert poll_until(mux, a.fileno()).data == "d"
        assert mux.poll(0) == []
        b.send(b"y")  # new data does not re-arm
        assert mux.poll(0.02) == []
        assert a in mux  # disarmed, still registered
        mux.modify(a, R, "again", trigger=Trigger.ONESHOT)
        assert poll_until(mux, a.fileno()).data == "again"
        assert mux.poll(0) == []


def test_oneshot_rearm_as_level(mux: Multiplexer) -> None:
    require(mux, Trigger.ONESHOT)
    a, b = socketpair()
    with a, b:
        mux.register(a, W, trigger=Trigger.ONESHOT)
        poll_until(mux, a.fileno())
        assert mux.poll(0) == []
        mux.modify(a, W, trigger=Trigger.LEVEL)
        assert ready_fds(mux.poll(0)) == {a.fileno(): int(W)}
        assert ready_fds(mux.poll(0)) == {a.fileno(): int(W)}


def test_unregister_disarmed_oneshot(mux: Multiplexer) -> None:
    require(mux, Trigger.ONESHOT)
    a, b = socketpair()
    with a, b:
        mux.register(a, W, trigger=Trigger.ONESHOT)
        poll_until(mux, a.fileno())
        mux.unregister(a)
        mux.register(a, W)
        assert ready_fds(mux.poll(0)) == {a.fileno(): int(W)}


def test_unsupported_trigger_is_refused_by_name(mux: Multiplexer) -> None:
    missing = [t for t in Trigger if t not in mux.capabilities.triggers]
    assert Trigger.LEVEL in mux.capabilities.triggers
    a, b = socketpair()
    with a, b:
        for trigger in missing:
            try:
                mux.register(a, R, trigger=trigger)
            except UnsupportedTrigger as exc:
                assert mux.name in str(exc) and str(trigger) in str(exc)
            else:
                raise AssertionError(f"{mux.name} accepted undeclared {trigger}")
            assert a not in mux
        # Every declared trigger is accepted.
        for trigger in mux.capabilities.triggers:
            mux.register(a, R, trigger=trigger)
            mux.unregister(a)
