"""The poll(2) driver.

poll has no limit on fd numbers, but the kernel walks every registered fd
on every wait: the cost grows with the number registered, not the number
ready. It has no edge triggering and no one-shot; one-shot is emulated
exactly by removing the fd from the set after reporting it.
"""

from __future__ import annotations

import select

from iomux.multiplexer import Capabilities, Trigger

from .pollable import PollLikeDriver


class PollDriver(PollLikeDriver):
    """Readiness through ``select.poll``."""

    name = "poll"
    capabilities = Capabilities(
        triggers=frozenset({Trigger.LEVEL, Trigger.ONESHOT}),
        wait_cost="O(registered)",
        notes={"oneshot": "emulated: removed from the poll set after one report"},
    )
    flaws = (
        "each wait copies and scans every registered fd: O(registered)",
        "no edge triggering",
        "registrations made from another thread take effect at the next wait",
    )
    emulate_oneshot = True
    _poller_factory = select.poll
    _EVENT_READ = select.POLLIN
    _EVENT_WRITE = select.POLLOUT
    _TRIGGER_FLAGS = {Trigger.LEVEL: 0, Trigger.ONESHOT: 0}
