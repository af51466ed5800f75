"""The io_uring driver: readiness from poll requests on a ring.

io_uring has no interest list: readiness comes from poll requests that
complete like any other operation. So the driver keeps one poll request in
flight per armed fd, and translates each trigger into a kind of request:

- LEVEL: a one-shot poll, re-armed after each report. The re-arm is only
  queued; it reaches the kernel with the next ``poll()``, which completes it
  at once if the fd is still ready. (``IORING_POLL_ADD_LEVEL`` exists but
  is rejected with EINVAL by the kernels this runs on.)
- EDGE: a multishot poll, which reports when armed if the fd is ready and
  then once per new wake-up, like ``EPOLLET``. The kernel may end it (no
  ``F_MORE`` flag), and then it is armed again.
- ONESHOT: a single one-shot poll; ``modify()`` arms a new one.

Nothing reaches the kernel before the next ``poll()``: the registrations
made between two waits are submitted together with the wait, in one
``io_uring_enter``.

Every request carries ``user_data = generation << 32 | fd``. A change of a
registration cancels the old request and arms a new one under a new
generation, so a completion that was already on its way for the old one is
recognised and dropped: no stale event ever reaches the caller.

Closing an fd does not cancel the requests on it, and a pending poll holds
the file open, so the peer of a closed socket does not see the close until
the fd is unregistered. Unregister before closing (the reactor does).
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Iterable
from typing import Any

from iomux.errors import BackendUnavailable
from iomux.multiplexer import Capabilities, Multiplexer, Registration, Trigger

from . import _uring
from ._uring import CQE, F_MORE, POLLIN, POLLOUT
from .pollable import PollMasks

_FD_MASK = 0xFFFFFFFF
#: user_data of the driver's own requests (poll removal): fd part is never an fd.
_INTERNAL = _FD_MASK
_GENERATIONS = 0x7FFFFFFF


class IoUringDriver(PollMasks, Multiplexer):
    """Readiness through poll requests on an io_uring ring (liburing via cffi)."""

    name = "io_uring"
    capabilities = Capabilities(
        triggers=frozenset({Trigger.LEVEL, Trigger.EDGE, Trigger.ONESHOT}),
        wait_cost="O(ready)",
        threadsafe_register=False,
        completion=True,
        notes={
            "level": "one-shot poll re-armed after each report",
            "edge": "multishot poll",
        },
    )
    flaws = (
        "needs liburing at build time and a kernel that allows io_uring "
        "(kernel.io_uring_disabled, container seccomp profiles)",
        "a level-triggered fd costs a new poll request after every report",
        "closing an fd does not cancel its poll request: unregister first, or the "
        "file stays open until then",
        "the ring belongs to the thread that first polls it (SINGLE_ISSUER)",
    )
    _EVENT_READ = POLLIN
    _EVENT_WRITE = POLLOUT
    _TRIGGER_FLAGS = {Trigger.LEVEL: 0, Trigger.EDGE: 0, Trigger.ONESHOT: 0}

    @classmethod
    def probe(cls) -> str | None:
        """Create a ring and run a no-op on it; say why not if that fails."""
        return _uring.probe()

    @classmethod
    def details(cls) -> dict[str, Any]:
        """Kernel and liburing versions, and the setup flags the kernel accepted."""
        info = _uring.describe()
        keep = ("kernel", "liburing", "setup_flags", "features")
        return {k: info[k] for k in keep if k in info}

    def __init__(self, entries: int = 256, cq_entries: int = 4096, capacity: int = 1024) -> None:
        try:
            self.ring = _uring.Ring(entries, cq_entries=cq_entries, capacity=capacity)
        except _uring.RingSetupError as exc:
            raise BackendUnavailable(self.name, exc.reason) from None
        # fd -> (user_data of the request in flight or 0, poll mask, trigger)
        self._live: dict[int, tuple[int, int, Trigger]] = {}
        self._generation = 0
        try:
            super().__init__()
        except BaseException:
            self.ring.close()
            raise

    def _control(self, fd: int, old: Registration | None, new: Registration | None) -> None:
        if old is None and new is not None:
            os.fstat(fd)  # OSError(EBADF) now rather than a failed request later
        live = self._live.pop(fd, None)
        if live is not None and live[0]:
            self.ring.poll_remove(live[0], _INTERNAL, skip_success=True)
        if new is not None:
            self._arm(fd, self._flags(new), new.trigger)

    def _arm(self, fd: int, mask: int, trigger: Trigger) -> None:
        self._generation = gen = self._generation % _GENERATIONS + 1
        user_data = gen << 32 | fd
        if trigger is Trigger.EDGE:
            self.ring.poll_multishot(fd, mask, user_data)
        else:
            self.ring.poll_add(fd, mask, user_data)
        self._live[fd] = (user_data, mask, trigger)

    def _wait(self, timeout: float | None) -> Iterable[tuple[int, int]]:
        ring = self.ring
        if timeout is None:
            raw = ring.enter(1, -1)
        elif timeout == 0:
            raw = ring.enter(0, 0)
        else:
            raw = ring.enter(1, math.ceil(timeout * 1e9))
        ready: list[tuple[int, int]] = []
        rearm: list[tuple[int, int, Trigger]] = []
        self._reap(raw, ready, rearm)
        # Take every completion now, and re-arm only afterwards: a re-arm
        # submitted by the next enter of this loop would complete again for
        # an fd the caller has not even seen yet.
        while ring.more:
            self._reap(ring.enter(0, 0), ready, rearm)
        for fd, mask, trigger in rearm:
            if trigger is Trigger.LEVEL:
                ring.poll_add(fd, mask, self._live[fd][0])
            else:
                self._arm(fd, mask, trigger)
        return ready

    def _reap(
        self,
        raw: memoryview,
        ready: list[tuple[int, int]],
        rearm: list[tuple[int, int, Trigger]],
    ) -> None:
        live = self._live
        for user_data, res, flags in CQE.iter_unpack(raw):
            fd = user_data & _FD_MASK
            state = live.get(fd)
            if state is None or state[0] != user_data:
                continue  # cancelled, replaced or internal: stale
            if res < 0:
                if res == -errno.ECANCELED:
                    continue
                # The request failed (the fd was closed under it): report it
                # as readiness so that the next read or write sees the error.
                live[fd] = (0, state[1], state[2])
                ready.append((fd, POLLIN | POLLOUT))
                continue
            trigger = state[2]
            if trigger is Trigger.LEVEL or (trigger is Trigger.EDGE and not flags & F_MORE):
                rearm.append((fd, state[1], trigger))
            elif trigger is Trigger.ONESHOT:
                live[fd] = (0, state[1], trigger)
            ready.append((fd, res))

    def _close(self) -> None:
        self._live.clear()
        self.ring.close()
