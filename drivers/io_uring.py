"""The io_uring driver: readiness from poll requests on a ring.

io_uring has no interest list: readiness comes from poll requests that
complete like any other operation. So the driver keeps one poll request in
flight per armed fd, and translates each trigger into a kind of request:

- LEVEL: a multishot poll, which the kernel reports once per new wake-up
  only; every fd it reported is checked again at the start of the next
  ``poll()`` by the C helper, with one ``poll(2)`` call for all of them,
  and reported again while it is still ready. This is how epoll itself
  implements level triggering (it re-checks the fds it reported), and it
  costs one system call per wait instead of a new poll request per report.
  (``IORING_POLL_ADD_LEVEL`` exists but is rejected with EINVAL by the
  kernels this runs on.)
- EDGE: a multishot poll, which reports when armed if the fd is ready and
  then once per new wake-up, like ``EPOLLET``.
- The kernel may end a multishot poll (no ``F_MORE`` flag, e.g. when the
  completion queue overflowed); it is then armed again.
- ONESHOT: a single one-shot poll; ``modify()`` arms a new one.

Nothing reaches the kernel before the next ``poll()``: the registrations
made between two waits are submitted together with the wait, in one
``io_uring_enter``.

Every request carries ``user_data = generation << 32 | fd`` (plus, for a
LEVEL poll, the bits that tell the helper what to re-check, and for the
others :data:`~iomux.drivers._uring.VERIFY`). The helper checks every poll
report with one ``poll(2)`` before handing it out: the kernel posts a
wake-up's readiness mask at the next enter, by when the data may have been
read, and epoll would not report such an fd. A change of a
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
import select
import threading
from collections.abc import Iterable
from typing import Any

from iomux.errors import BackendUnavailable
from iomux.multiplexer import Capabilities, Multiplexer, Registration, Trigger

from . import _uring
from ._uring import COMPLETION_TAG, CQE, F_MORE, LEVEL_IN, LEVEL_OUT, POLLIN, POLLOUT, VERIFY
from .pollable import PollMasks

_FD_MASK = 0xFFFFFFFF
#: Set in the user_data of a removal request, whose other bits name its target.
_REMOVAL = 1 << 62
#: Generations fit in bits 32..55 (bits 56 and 57 are the LEVEL re-check bits).
_GENERATIONS = 0xFFFFFF


class IoUringDriver(PollMasks, Multiplexer):
    """Readiness through poll requests on an io_uring ring (liburing via cffi)."""

    name = "io_uring"
    capabilities = Capabilities(
        triggers=frozenset({Trigger.LEVEL, Trigger.EDGE, Trigger.ONESHOT}),
        wait_cost="O(ready)",
        threadsafe_register=False,
        completion=True,
        pollable_fd=True,
        notes={
            "level": "multishot poll; the fds it reported are checked again by the "
            "next wait, with one poll(2)",
            "edge": "multishot poll",
        },
    )
    flaws = (
        "needs liburing at build time and a kernel that allows io_uring "
        "(kernel.io_uring_disabled, container seccomp profiles)",
        "each wait with level-triggered fds reported last time costs one poll(2) "
        "call to check them again",
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
        """Kernel and liburing versions, the setup flags the kernel accepted, stream features."""
        info = _uring.describe()
        keep = ("kernel", "liburing", "setup_flags", "features", "ring_features", "stream_features")
        return {k: info[k] for k in keep if k in info}

    def __init__(self, entries: int = 256, cq_entries: int = 4096, capacity: int = 1024) -> None:
        self._sizes = (entries, cq_entries, capacity)
        self.ring = self._new_ring(single_issuer=True)
        # fd -> (user_data of the request in flight or 0, poll mask, trigger)
        self._live: dict[int, tuple[int, int, Trigger]] = {}
        # user_data -> fd of every poll request in flight: the fast path of _reap.
        self._polls: dict[int, int] = {}
        self._generation = 0
        # Completions taken out of the ring outside a wait, for the next wait.
        self._backlog: list[tuple[int, int, int]] = []
        self._owner: int | None = None
        self._port: _uring.StreamPort | None = None
        self._resync = False
        self._eager = False  # set once fileno() is handed out
        try:
            super().__init__()
        except BaseException:
            self.ring.close()
            raise

    def _control(self, fd: int, old: Registration | None, new: Registration | None) -> None:
        if old is None and new is not None:
            os.fstat(fd)  # OSError(EBADF) now rather than a failed request later
        live = self._live.pop(fd, None)
        removed = live is not None and live[0] != 0
        if removed:
            self._polls.pop(live[0], None)  # type: ignore[index]
            self._remove(live[0])  # type: ignore[index]
        if new is not None:
            self._arm(fd, self._flags(new), new.trigger)
        # Submit at once, as epoll would, when a host waits on fileno()
        # rather than in poll(), and when a poll request that holds the file
        # open is removed, so that closing the fd after unregister() really
        # closes it. (From another thread than the ring's own it cannot be
        # entered; close() frees everything.)
        if (self._eager or (removed and new is None)) and self._owner in (
            None,
            threading.get_ident(),
        ):
            self._enter_now()

    def _arm(self, fd: int, mask: int, trigger: Trigger) -> None:
        self._generation = gen = self._generation % _GENERATIONS + 1
        user_data = gen << 32 | fd
        if trigger is Trigger.LEVEL:
            user_data |= (LEVEL_IN if mask & POLLIN else 0) | (LEVEL_OUT if mask & POLLOUT else 0)
            self.ring.poll_level(fd, mask, user_data)
        elif trigger is Trigger.EDGE:
            user_data |= VERIFY
            self.ring.poll_multishot(fd, mask, user_data)
        else:
            user_data |= VERIFY
            self.ring.poll_add(fd, mask, user_data)
        self._live[fd] = (user_data, mask, trigger)
        self._polls[user_data] = fd

    def _remove(self, user_data: int) -> None:
        # Only failures complete (SKIP_SUCCESS); they carry the target's tag.
        self.ring.poll_remove(user_data, _REMOVAL | user_data, skip_success=True)

    def _enter_now(self, *, recheck: bool = False) -> None:
        """Submit what is queued and keep the completions for the next wait."""
        self._owner = threading.get_ident()
        for _ in range(8):
            self._backlog += CQE.iter_unpack(self.ring.enter(0, 0, recheck=recheck))
            recheck = False
            retried = self._retry_removals()
            if not retried and not self.ring.more:
                break
        if self._backlog and self._eager:
            # Completions taken out of the ring do not make its fd readable:
            # fire the wakeup fd so that the host comes back to poll().
            self._waker.wake()

    def _retry_removals(self) -> bool:
        retried = False
        keep = []
        for item in self._backlog:
            user_data, res, _ = item
            if user_data & _REMOVAL:
                # EALREADY: the poll was running its wake-up; removing it
                # again after that succeeds. Any other failure (ENOENT) means
                # it is gone already.
                if res == -errno.EALREADY:
                    self._remove(user_data & ~_REMOVAL)
                    retried = True
            else:
                keep.append(item)
        self._backlog = keep
        return retried

    def _wait(self, timeout: float | None) -> Iterable[tuple[int, int]]:
        if self._resync:
            self._rearm_all()
        try:
            return self._wait_once(timeout)
        except BaseException:
            # A signal handler raised (or worse) after completions were taken
            # from the ring but before they were handled: their fds would go
            # silent. Re-arm every registration before the next wait.
            self._resync = True
            raise

    def _rearm_all(self) -> None:
        self._resync = False
        for fd, (user_data, mask, trigger) in list(self._live.items()):
            if user_data:
                self._polls.pop(user_data, None)
                self._remove(user_data)
            if trigger is not Trigger.ONESHOT or user_data:
                self._arm(fd, mask, trigger)

    def _wait_once(self, timeout: float | None) -> Iterable[tuple[int, int]]:
        ring = self.ring
        self._owner = threading.get_ident()  # SINGLE_ISSUER binds the ring to it
        ready: list[tuple[int, int]] = []
        rearm: list[tuple[int, int, Trigger]] = []
        backlog = self._backlog
        if backlog:
            self._backlog = []
            self._reap(backlog, ready, rearm)
            if ready:
                ready = self._still_ready(ready, rearm)
            timeout = 0
        if timeout is None:
            raw = ring.enter(1, -1, recheck=True, new_batch=True)
        elif timeout == 0:
            raw = ring.enter(0, 0, recheck=True, new_batch=True)
        else:
            raw = ring.enter(1, math.ceil(timeout * 1e9), recheck=True, new_batch=True)
        self._reap(CQE.iter_unpack(raw), ready, rearm)
        # Take every completion now, and re-arm only afterwards: a poll
        # armed by the next enter of this loop would report again an fd the
        # caller has not even seen yet.
        while ring.more and not ring.streams_full:
            self._reap(CQE.iter_unpack(ring.enter(0, 0)), ready, rearm)
        port = self._port
        if port is not None and port.pending:
            self._woken = True  # poll() returns for stream events and file operations too
        for fd, mask, trigger in rearm:
            self._arm(fd, mask, trigger)
        if backlog and ready:
            # The backlog and this wait's re-check may both report an fd.
            merged: dict[int, int] = {}
            for fd, ev in ready:
                merged[fd] = merged.get(fd, 0) | ev
            return merged.items()
        return ready

    def _still_ready(
        self, ready: list[tuple[int, int]], rearm: list[tuple[int, int, Trigger]]
    ) -> list[tuple[int, int]]:
        # Reports taken out of the ring before this wait (the helper checked
        # them then) may be stale by now: check them again with poll(2).
        masks: dict[int, int] = {}
        for fd, res in ready:
            masks[fd] = masks.get(fd, 0) | res
        checker = select.poll()
        for fd, res in masks.items():
            checker.register(fd, res & (POLLIN | POLLOUT | select.POLLPRI))
        now = dict(checker.poll(0))
        kept = []
        for fd in masks:
            ev = now.get(fd, 0)
            if ev:
                kept.append((fd, ev))
                continue
            state = self._live.get(fd)
            if state is not None and state[0] == 0 and state[2] is Trigger.ONESHOT:
                rearm.append((fd, state[1], state[2]))  # fired for nothing: arm again
        return kept

    def _reap(
        self,
        completions: Iterable[tuple[int, int, int]],
        ready: list[tuple[int, int]],
        rearm: list[tuple[int, int, Trigger]],
    ) -> None:
        polls = self._polls
        append = ready.append
        for user_data, res, flags in completions:
            fd = polls.get(user_data)
            if fd is not None and res > 0 and flags & F_MORE:
                append((fd, res))  # a multishot poll reporting, and staying armed
            else:
                self._reap_other(user_data, res, flags, ready, rearm)

    def _reap_other(
        self,
        user_data: int,
        res: int,
        flags: int,
        ready: list[tuple[int, int]],
        rearm: list[tuple[int, int, Trigger]],
    ) -> None:
        if user_data & COMPLETION_TAG:
            # A file operation of the completion port: its callback runs when
            # the port's events are dispatched.
            if self._port is not None:
                self._port._op_done(user_data, res)
                self._woken = True  # poll() returns for these even without events
            return
        live = self._live
        fd = user_data & _FD_MASK
        state = live.get(fd)
        if state is None or state[0] != user_data:
            if user_data & _REMOVAL:
                if res == -errno.EALREADY:
                    self._remove(user_data & ~_REMOVAL)
            elif flags & F_MORE:
                self._remove(user_data)  # a replaced multishot poll still alive
            return
        if res < 0:
            if res == -errno.ECANCELED:
                return
            # The request failed (the fd was closed under it): report it
            # as readiness so that the next read or write sees the error.
            self._polls.pop(user_data, None)
            live[fd] = (0, state[1], state[2])
            ready.append((fd, POLLIN | POLLOUT))
            return
        if not flags & F_MORE:
            self._polls.pop(user_data, None)
            trigger = state[2]
            if trigger is Trigger.ONESHOT and res:
                live[fd] = (0, state[1], trigger)
            else:
                # The kernel ended it, or a one-shot poll reported readiness
                # that was gone when checked (res 0): arm it again.
                rearm.append((fd, state[1], trigger))
        if res:
            ready.append((fd, res))

    def _new_ring(self, *, single_issuer: bool) -> _uring.Ring:
        entries, cq_entries, capacity = self._sizes
        try:
            return _uring.Ring(
                entries, cq_entries=cq_entries, capacity=capacity, single_issuer=single_issuer
            )
        except _uring.RingSetupError as exc:
            raise BackendUnavailable(self.name, exc.reason) from None

    def _switch_to_pollable_ring(self) -> None:
        # With DEFER_TASKRUN the kernel runs poll wake-ups only when the ring's
        # owner enters it, so a host blocked in epoll_wait on the ring's fd is
        # never woken. A ring without it wakes fd waiters: move everything there.
        if self.ring._groups or self.ring._sends or self._port is not None:
            raise RuntimeError(
                "call fileno() before starting completion operations on this io_uring "
                "multiplexer: the ring must be re-created to be pollable"
            )
        old, self.ring = self.ring, self._new_ring(single_issuer=False)
        old.close()
        self._backlog.clear()
        self._polls.clear()
        for fd, (user_data, mask, trigger) in list(self._live.items()):
            if user_data or trigger is not Trigger.ONESHOT:
                self._arm(fd, mask, trigger)

    def completion_port(self) -> _uring.StreamPort:
        """The ring's stream connections (:class:`iomux.completion.CompletionPort`).

        Made on the first call: a provided-buffer ring and a connection
        table on this multiplexer's ring, driven by its ``poll()``.
        Multishot receive needs Linux 6.0; older kernels raise OSError.
        """
        self._check_usable()
        if self._port is None:
            release = os.uname().release.split("-", 1)[0].split(".")
            try:
                version = (int(release[0]), int(release[1]))
            except (IndexError, ValueError):
                version = (0, 0)
            if version < (6, 0):
                raise OSError(
                    errno.ENOSYS,
                    f"multishot receive needs Linux 6.0 or newer, this is {os.uname().release}",
                )
            self._port = self.ring.stream_port(submitter=self.submit)
        return self._port

    def fileno(self) -> int:
        """The ring's fd: readable when completions (or deferred work) wait.

        The first call re-creates the ring without ``DEFER_TASKRUN`` (whose
        wake-ups only run when the ring's owner enters it, so they never wake
        a host waiting on the fd), moving every registration over. From then
        on registration changes are submitted at once, since the host may wait
        on this fd instead of in :meth:`poll`. Call
        :meth:`submit` before each such wait: it submits what is queued and
        checks again the level-triggered fds the last ``poll()`` reported.
        """
        self._check_usable()
        if "DEFER_TASKRUN" in self.ring.setup_flag_names:
            port = self._port
            if port is not None and not port.used:
                self._port = None  # made but never used: made again on the new ring
            self._switch_to_pollable_ring()
        self._eager = True
        return self.ring.fileno()

    def submit(self) -> None:
        """Submit queued requests now (from the thread that polls the ring)."""
        self._check_usable()
        if self._owner in (None, threading.get_ident()):
            # Also re-check the level-triggered fds reported last time: a
            # host waiting on fileno() sees no ring activity for an fd that
            # merely stays ready.
            self._enter_now(recheck=True)
        if self._backlog:
            self._waker.wake()  # see _enter_now

    def _close(self) -> None:
        self._live.clear()
        self._polls.clear()
        self.ring.close()
