"""A hypothesis state machine: the driver against a plain model of registrations."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from iomux import Interest, Multiplexer, Trigger

from .helpers import drain, socketpair

POOL = 6
interests = st.sampled_from([Interest.READ, Interest.WRITE, Interest.READ | Interest.WRITE])


class _Machine(RuleBasedStateMachine):
    driver: type[Multiplexer]

    def __init__(self) -> None:
        super().__init__()
        self.mux = self.driver()
        self.pairs = [socketpair() for _ in range(POOL)]
        self.model: dict[
            int, tuple[int, object, Trigger]
        ] = {}  # index -> (interest, data, trigger)
        self.pending = [False] * POOL  # data waiting on pairs[i][0]
        self.fired: set[int] = set()  # ONESHOT indexes already reported
        self.triggers = sorted(
            {Trigger.LEVEL, Trigger.ONESHOT} & self.driver.capabilities.triggers,
            key=lambda t: t.value,
        )

    def teardown(self) -> None:
        self.mux.close()
        for a, b in self.pairs:
            a.close()
            b.close()

    def fd(self, i: int) -> int:
        return self.pairs[i][0].fileno()

    @rule(i=st.integers(0, POOL - 1), interest=interests, data=st.integers(), t=st.integers(0, 1))
    def register(self, i: int, interest: Interest, data: int, t: int) -> None:
        trigger = self.triggers[t % len(self.triggers)]
        if i in self.model:
            with pytest.raises(KeyError):
                self.mux.register(self.pairs[i][0], interest, data, trigger=trigger)
        else:
            self.mux.register(self.pairs[i][0], interest, data, trigger=trigger)
            self.model[i] = (int(interest), data, trigger)
            self.fired.discard(i)

    @rule(i=st.integers(0, POOL - 1), interest=interests, data=st.integers(), t=st.integers(0, 1))
    def modify(self, i: int, interest: Interest, data: int, t: int) -> None:
        trigger = self.triggers[t % len(self.triggers)]
        if i not in self.model:
            with pytest.raises(KeyError):
                self.mux.modify(self.fd(i), interest, data, trigger=trigger)
        else:
            self.mux.modify(self.fd(i), interest, data, trigger=trigger)
            self.model[i] = (int(interest), data, trigger)
            self.fired.discard(i)

    @rule(i=st.integers(0, POOL - 1))
    def unregister(self, i: int) -> None:
        if i not in self.model:
            with pytest.raises(KeyError):
                self.mux.unregister(self.pairs[i][0])
        else:
            assert self.mux.unregister(self.pairs[i][0]).data == self.model.pop(i)[1]

    @rule(i=st.integers(0, POOL - 1), bad=st.sampled_from([0, 4, -1]))
    def bad_modify(self, i: int, bad: int) -> None:
        with pytest.raises((KeyError, ValueError)):
            self.mux.modify(self.fd(i), bad)

    @rule(i=st.integers(0, POOL - 1))
    def send(self, i: int) -> None:
        self.pairs[i][1].send(b"d")
        self.pending[i] = True

    @rule(i=st.integers(0, POOL - 1))
    def consume(self, i: int) -> None:
        drain(self.pairs[i][0])
        self.pending[i] = False

    @rule()
    def poll(self) -> None:
        expected: dict[int, tuple[int, object]] = {}
        for i, (interest, data, trigger) in self.model.items():
            ready = int(Interest.WRITE) | (int(Interest.READ) if self.pending[i] else 0)
            mask = ready & interest
            if mask and not (trigger is Trigger.ONESHOT and i in self.fired):
                expected[self.fd(i)] = (mask, data)
        got = {e.fd: (int(e.events), e.data) for e in self.mux.poll(0)}
        assert got == expected
        for i, (_, _, trigger) in self.model.items():
            if trigger is Trigger.ONESHOT and self.fd(i) in got:
                self.fired.add(i)

    @invariant()
    def registrations_match(self) -> None:
        assert len(self.mux) == len(self.model)
        for i, (interest, data, trigger) in self.model.items():
            reg = self.mux[self.fd(i)]
            assert (int(reg.interest), reg.data, reg.trigger) == (interest, data, trigger)


def test_driver_matches_model(driver: type[Multiplexer]) -> None:
    machine: Any = type(f"{driver.name}Machine", (_Machine,), {"driver": driver})
    test_case = machine.TestCase
    test_case.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
    test_case().runTest()
