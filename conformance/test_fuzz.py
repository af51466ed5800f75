"""Random sequences of valid and invalid calls: only documented exceptions, no stale events."""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from iomux import Interest, InvalidFileObject, Multiplexer, Trigger, UnsupportedTrigger

from .helpers import socketpair

SLOTS = 5
interests = st.sampled_from([1, 2, 3, 0, 4, -1, "r", None])
triggers = st.sampled_from([*Trigger, "level"])
bad_files = st.sampled_from([-1, object(), "3", 1.5, None])


class _Fuzz(RuleBasedStateMachine):
    driver: type[Multiplexer]

    def __init__(self) -> None:
        super().__init__()
        self.mux = self.driver()
        self.slots: list[tuple[socket.socket, socket.socket] | None] = [
            socketpair() for _ in range(SLOTS)
        ]
        self.registered: dict[int, object] = {}  # fd -> data

    def teardown(self) -> None:
        self.mux.close()
        for pair in self.slots:
            if pair is not None:
                pair[0].close()
                pair[1].close()

    def _sock(self, i: int) -> socket.socket | None:
        pair = self.slots[i]
        return None if pair is None else pair[0]

    def _valid(self, interest: Any, trigger: Any) -> bool:
        return (
            isinstance(interest, int)
            and interest in (1, 2, 3)
            and isinstance(trigger, Trigger)
            and trigger in self.mux.capabilities.triggers
        )

    @rule(i=st.integers(0, SLOTS - 1), interest=interests, trigger=triggers, data=st.integers())
    def register(self, i: int, interest: Any, trigger: Any, data: int) -> None:
        sock = self._sock(i)
        if sock is None:
            return
        fd = sock.fileno()
        try:
            self.mux.register(sock, interest, data, trigger=trigger)
        except KeyError:
            assert fd in self.registered
        except (TypeError, ValueError, UnsupportedTrigger):
            assert not self._valid(interest, trigger)
        else:
            assert fd not in self.registered and self._valid(interest, trigger)
            self.registered[fd] = data

    @rule(i=st.integers(0, SLOTS - 1), interest=interests, trigger=triggers, data=st.integers())
    def modify(self, i: int, interest: Any, trigger: Any, data: int) -> None:
        sock = self._sock(i)
        if sock is None:
            return
        fd = sock.fileno()
        try:
            self.mux.modify(sock, interest, data, trigger=trigger)
        except KeyError:
            assert fd not in self.registered
        except (TypeError, ValueError, UnsupportedTrigger):
            assert not self._valid(interest, trigger) or fd not in self.registered
        else:
            self.registered[fd] = data

    @rule(i=st.integers(0, SLOTS - 1))
    def unregister(self, i: int) -> None:
        sock = self._sock(i)
        if sock is None:
            return
        try:
            self.mux.unregister(sock)
        except KeyError:
            assert sock.fileno() not in self.registered
        else:
            del self.registered[sock.fileno()]

    @rule(i=st.integers(0, SLOTS - 1), unregister_first=st.booleans())
    def close_and_reuse(self, i: int, unregister_first: bool) -> None:
        pair = self.slots[i]
        if pair is None:
            self.slots[i] = socketpair()
            return
        fd = pair[0].fileno()
        if unregister_first and fd in self.registered:
            self.mux.unregister(pair[0])
            del self.registered[fd]
        pair[0].close()
        pair[1].close()
        if fd in self.registered:
            # Unregistering a closed file works, by identity.
            assert self.mux.unregister(pair[0]).fd == fd
            del self.registered[fd]
        self.slots[i] = None

    @rule(i=st.integers(0, SLOTS - 1))
    def send(self, i: int) -> None:
        pair = self.slots[i]
        if pair is not None:
            try:
                pair[1].send(b"z")
            except BlockingIOError:
                pass

    @rule(i=st.integers(0, SLOTS - 1))
    def recv(self, i: int) -> None:
        sock = self._sock(i)
        if sock is not None:
            try:
                sock.recv(4096)
            except BlockingIOError:
                pass

    @rule(bad=bad_files)
    def bad_file(self, bad: Any) -> None:
        try:
            self.mux.register(bad, Interest.READ)
        except InvalidFileObject:
            assert not isinstance(bad, int)
        except ValueError:
            assert isinstance(bad, int) and bad < 0
        else:
            raise AssertionError(f"registered {bad!r}")

    @rule()
    def closed_fd(self) -> None:
        r, w = os.pipe()
        os.close(r)
        os.close(w)
        try:
            self.mux.register(r, Interest.READ)
        except OSError as exc:
            assert exc.errno == errno.EBADF
        else:
            raise AssertionError("registered a closed fd")

    @rule(timeout=st.sampled_from([0, 0, 0.001, -5]))
    def poll(self, timeout: float) -> None:
        for ev in self.mux.poll(timeout):
            assert ev.fd in self.registered, f"stale event for fd {ev.fd}"
            assert ev.data == self.registered[ev.fd], "event carries old data"

    @invariant()
    def same_registrations(self) -> None:
        assert {r.fd: r.data for r in self.mux} == self.registered


def test_random_calls(driver: type[Multiplexer]) -> None:
    machine: Any = type(f"{driver.name}Fuzz", (_Fuzz,), {"driver": driver})
    machine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
    machine.TestCase().runTest()
