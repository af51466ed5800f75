"""``iomux._ready.collect``: the per-event loop of ``Multiplexer.ready()`` in C. It must
give what the Python loop in ``Multiplexer._collect`` gives (the conformance suite runs
``ready()`` on every driver with it; ``IOMUX_SPEEDUPS=0`` runs the Python loop), and
refuse what it cannot take with the error the Python loop would raise."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import iomux
from iomux import multiplexer
from iomux.multiplexer import Registration

try:
    from iomux._ready import collect
except ImportError:  # pragma: no cover - the failure test_it_is_built_here reports
    collect = None  # type: ignore[assignment]

needs_collect = pytest.mark.skipif(collect is None, reason="iomux._ready is not built")
WAKER = 99


def test_it_is_built_here_and_used_unless_turned_off() -> None:
    # Built with the package wherever a C compiler is, as the loop's extension.
    if collect is None:  # pragma: no cover - the failure this test exists for
        pytest.fail("iomux._ready was not built; reinstall with a C compiler")
    assert multiplexer._collect_ready is (
        None if os.environ.get("IOMUX_SPEEDUPS") == "0" else collect
    )
    code = "from iomux import multiplexer; print(multiplexer._collect_ready)"
    env = {**os.environ, "IOMUX_SPEEDUPS": "0"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr


def registration(fd: int, data: Any) -> Registration:
    return Registration(fd, fd, iomux.Interest.READ, data, iomux.Trigger.LEVEL)


class Translate:
    """A driver's _translate: kernel bits 0x10 read, 0x20 write; counts its calls."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, ev: int) -> int:
        self.calls.append(ev)
        return (1 if ev & 0x10 else 0) | (2 if ev & 0x20 else 0)


def run(pairs: Any, want: dict[int, int], regs: dict[int, Any]) -> tuple[list[Any], bool, Any]:
    masks: dict[int, int] = {}
    translate = Translate()
    events: list[Any] = []
    woken = collect(pairs, want, masks, regs, translate, WAKER, events)
    return events, woken, (masks, translate.calls)


@needs_collect
def test_it_keeps_registered_fds_that_want_the_event_in_order() -> None:
    want = {3: 1, 4: 3, 5: 2, 6: 0}  # 6: a disarmed one-shot
    regs = {fd: registration(fd, f"d{fd}") for fd in want}
    pairs = [(4, 0x30), (3, 0x30), (5, 0x10), (7, 0x10), (6, 0x10), (3, 0x10)]
    events, woken, (masks, calls) = run(pairs, want, regs)
    assert events == [(4, 3, "d4"), (3, 1, "d3"), (3, 1, "d3")]  # 5 wants write, 7 unknown
    assert woken is False
    assert all(type(mask) is int for _, mask, _ in events)
    assert masks == {0x30: 3, 0x10: 1} and calls == [0x30, 0x10]  # each kernel value once


@needs_collect
def test_the_waker_is_reported_not_listed() -> None:
    events, woken, _ = run([(WAKER, 0x10), (3, 0x10)], {3: 1}, {3: registration(3, None)})
    assert woken is True and events == [(3, 1, None)]


@needs_collect
def test_any_iterable_of_pairs() -> None:
    regs = {3: registration(3, "x")}

    def generated() -> Iterator[list[int]]:
        yield [3, 0x10]

    for pairs in (generated(), iter([(3, 0x10)]), ((3, 0x10),)):
        assert run(pairs, {3: 1}, regs)[0] == [(3, 1, "x")]


@needs_collect
def test_registrations_other_than_tuples_give_their_data() -> None:
    class Reg:
        data = "attribute"

    assert run([(3, 0x10)], {3: 1}, {3: Reg()})[0] == [(3, 1, "attribute")]


@needs_collect
def test_errors_are_those_of_the_python_loop_and_keep_what_came_before() -> None:
    regs = {3: registration(3, "x")}
    events: list[Any] = []
    with pytest.raises(KeyError):  # wanted but not registered: registrations[fd]
        collect([(3, 0x10), (4, 0x10)], {3: 1, 4: 1}, {}, regs, Translate(), WAKER, events)
    assert events == [(3, 1, "x")]
    with pytest.raises(ValueError, match=r"\(fd, event\) pairs"):
        collect([(3, 0x10, 0)], {3: 1}, {}, regs, Translate(), WAKER, [])

    def failing(ev: int) -> int:
        raise OSError("from translate")

    masks: dict[int, int] = {}
    with pytest.raises(OSError, match="from translate"):
        collect([(3, 0x10)], {3: 1}, masks, regs, failing, WAKER, [])
    assert masks == {}
    with pytest.raises(TypeError, match="argument 2 must be a dict"):
        collect([], [], {}, regs, Translate(), WAKER, [])
    with pytest.raises(TypeError, match="events must be a list"):
        collect([], {}, {}, regs, Translate(), WAKER, ())
    with pytest.raises(TypeError, match="takes 7 arguments"):
        collect([], {}, {})  # type: ignore[call-arg]


def test_ready_is_the_same_with_the_python_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    with a, b, c, d, iomux.open_multiplexer("epoll") as mux:
        mux.register(a, iomux.Interest.READ | iomux.Interest.WRITE, "a")
        mux.register(c, iomux.Interest.READ, "c")
        b.send(b"x")
        with_c = sorted(mux.ready(1.0))
        monkeypatch.setattr(multiplexer, "_collect_ready", None)
        assert sorted(mux.ready(1.0)) == with_c == [(a.fileno(), 3, "a")]
