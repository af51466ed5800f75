"""The Multiplexer contract.

A multiplexer watches file descriptors and tells you which are ready. Every
driver (select, poll, epoll, io_uring, or a third party's) implements this one
contract, and the conformance suite in :mod:`iomux.conformance` checks it.

Readiness. A registration names an *interest*: ``Interest.READ``,
``Interest.WRITE`` or both. ``poll()`` returns an :class:`Event` for each
registered fd that is ready for something it is interested in. Hang-up and
error conditions are not separate flags: they are reported as readiness for
whatever was registered, so that the next ``recv``/``send`` sees the EOF or
the error (this is what :mod:`selectors` does). Readiness is a hint, never a
promise: use non-blocking fds and tolerate ``EAGAIN``.

Triggers. ``Trigger.LEVEL`` (the default, every driver) reports an fd on every
``poll()`` while it stays ready. ``Trigger.EDGE`` reports it once per new
readiness: after a report, nothing more comes until the caller has drained
the fd (read until ``EAGAIN``) and new data arrives. ``Trigger.ONESHOT``
reports it once and then disarms it until ``modify()`` re-arms it; the
registration stays in place meanwhile. A driver declares the triggers it
supports in :attr:`Multiplexer.capabilities`; asking for another raises
:class:`~iomux.errors.UnsupportedTrigger`. Drivers emulate a trigger only when
the emulation is exact (one-shot on select and poll); edge triggering cannot
be emulated from outside the kernel, so select and poll do not offer it.

Timeouts. ``poll(None)`` blocks until an event or ``wakeup()``; ``poll(0)``
(or a negative value) never blocks; a positive timeout never returns early
with nothing to report. Kernels count in milliseconds or coarser: rounding a
timeout down would turn a 0.5 ms wait into a busy loop, so the base class
waits again for whatever remains. A signal arriving during the wait (EINTR)
resumes the wait with the remaining time, unless its Python handler raised,
in which case the exception propagates out of ``poll()``.

State. Every change to what the kernel watches goes through one method,
:meth:`Multiplexer._control`, called with the old and the new registration.
If it raises, the multiplexer's own record is left as it was: nothing is
half-registered.
"""

from __future__ import annotations

import enum
import io
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Protocol, Union

from .errors import ForkedError, InvalidFileObject, MultiplexerClosed, UnsupportedTrigger
from .native import enabled as _native_enabled
from .waker import Waker

try:  # ready()'s per-event loop in C, where built (see _collect)
    from . import _ready
except ImportError:  # built without a C compiler: the same loop in Python
    _ready = None  # type: ignore[assignment]
_collect_ready = _ready.collect if _ready is not None and _native_enabled() else None


class Interest(enum.IntFlag):
    """What a registration waits for, and what an event reports as ready."""

    READ = 1
    WRITE = 2


class Trigger(enum.Enum):
    """When a ready fd is reported (see the module documentation)."""

    LEVEL = "level"
    EDGE = "edge"
    ONESHOT = "oneshot"

    def __str__(self) -> str:
        return f"Trigger.{self.name}"


ALL_INTEREST = int(Interest.READ | Interest.WRITE)
# Event masks are built from this table: constructing an IntFlag per event
# costs more than the rest of the event's handling.
MASKS = (Interest(0), Interest.READ, Interest.WRITE, Interest.READ | Interest.WRITE)
#: The longest single wait handed to a driver, in seconds. select, poll and
#: epoll cannot express much more than 2**31 ms; a longer timeout is waited
#: out in slices (poll() goes on until its deadline).
MAX_WAIT = 86_400.0


class HasFileno(Protocol):
    """Anything with a ``fileno()`` method, such as a socket or a file."""

    def fileno(self) -> int:
        """Return the underlying file descriptor."""
        ...


FileObject = Union[int, HasFileno]  # noqa: UP007 - a runtime alias on 3.10


class Event(NamedTuple):
    """One ready fd as returned by :meth:`Multiplexer.poll`."""

    fd: int
    events: Interest
    data: Any


class Registration(NamedTuple):
    """What is registered for one fd."""

    fileobj: FileObject
    fd: int
    interest: Interest
    data: Any
    trigger: Trigger


@dataclass(frozen=True)
class Capabilities:
    """What a driver can do, declared by the driver and reported by ``iomux info``."""

    triggers: frozenset[Trigger]
    #: Highest fd number + 1 the driver can watch, or None (only RLIMIT_NOFILE).
    max_fd: int | None = None
    #: How the cost of one wait grows: "O(ready)" or "O(registered)".
    wait_cost: str = "O(registered)"
    #: Whether register/modify/unregister may be called from another thread
    #: while a poll() is blocked, with the change taking effect in that wait.
    threadsafe_register: bool = False
    #: Whether the driver offers completion operations (accept/recv/send on the ring).
    completion: bool = False
    #: Whether :meth:`Multiplexer.fileno` gives one fd that a host loop can wait on.
    pollable_fd: bool = False
    #: How trigger support is achieved, e.g. {"oneshot": "emulated"}.
    notes: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Return the capabilities as plain JSON-friendly values."""
        return {
            "triggers": sorted(t.value for t in self.triggers),
            "max_fd": self.max_fd,
            "wait_cost": self.wait_cost,
            "threadsafe_register": self.threadsafe_register,
            "completion": self.completion,
            "pollable_fd": self.pollable_fd,
            "notes": dict(self.notes),
        }


def fileobj_to_fd(fileobj: object) -> int:
    """Return the fd of an int or an object with ``fileno()``.

    Raises :class:`~iomux.errors.InvalidFileObject` (a TypeError and a
    ValueError) for other objects and ValueError for negative numbers.
    """
    if isinstance(fileobj, int) and not isinstance(fileobj, bool):
        fd = fileobj
    else:
        fileno = getattr(fileobj, "fileno", None)
        if fileno is None:
            raise InvalidFileObject(
                f"{fileobj!r} is not a file descriptor: pass an int fd or an object "
                "with a fileno() method"
            )
        try:
            fd = int(fileno())
        except (AttributeError, TypeError, ValueError) as exc:
            raise InvalidFileObject(f"{fileobj!r}.fileno() failed: {exc}") from None
    if fd < 0:
        raise ValueError(f"invalid file descriptor {fd} for {fileobj!r} (closed?)")
    return fd


def check_interest(interest: object) -> Interest:
    """Validate an interest mask and return it as :class:`Interest`."""
    if isinstance(interest, bool) or not isinstance(interest, int):
        raise TypeError(f"interest must be an iomux.Interest, not {interest!r}")
    if interest == 0 or interest & ~ALL_INTEREST:
        raise ValueError(
            f"invalid interest {interest!r}: use Interest.READ, Interest.WRITE or both"
        )
    return MASKS[interest]


# Multiplexers hold kernel objects that a forked child shares with its parent
# (an epoll set, a ring). Each instance remembers the fork generation it was
# made in; the child bumps the generation.
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


class Multiplexer(ABC):
    """Abstract interface of every iomux driver.

    Subclasses set :attr:`name` and :attr:`capabilities`, create their kernel
    object in ``__init__`` before calling ``super().__init__()``, and
    implement :meth:`_control`, :meth:`_wait` and :meth:`_close`.
    """

    #: The backend name, as used by ``open_multiplexer`` and ``iomux info``.
    name: ClassVar[str] = "abstract"
    capabilities: ClassVar[Capabilities] = Capabilities(frozenset({Trigger.LEVEL}))
    #: Short, frank statements of the backend's weaknesses, for ``iomux info``.
    flaws: ClassVar[tuple[str, ...]] = ()
    #: True when the kernel object cannot do one-shot and the base class must
    #: disarm a ONESHOT registration itself after reporting it.
    emulate_oneshot: ClassVar[bool] = False
    #: How this instance was chosen, set by ``open_multiplexer`` (a ``Selection``).
    selection: Any = None

    @classmethod
    def probe(cls) -> str | None:
        """Return None if the driver can run here, else the reason it cannot."""
        return None

    @classmethod
    def details(cls) -> dict[str, Any]:
        """Facts for ``iomux info`` beyond the capabilities (versions, flags)."""
        return {}

    def __init__(self) -> None:
        self._map: dict[int, Registration] = {}
        # fd -> interest bits as a plain int (0 while a ONESHOT is disarmed):
        # IntFlag arithmetic costs a microsecond per event on the hot path.
        self._want: dict[int, int] = {}
        self._ev_masks: dict[int, int] = {}
        self._closed = False
        self._pid = os.getpid()
        self._fork_gen = _fork_generation
        self._woken = False
        self._waker = Waker()
        self._waker_fd = self._waker.fileno()
        try:
            self._control(
                self._waker_fd,
                None,
                Registration(self._waker_fd, self._waker_fd, Interest.READ, None, Trigger.LEVEL),
            )
        except BaseException:
            self._waker.close()
            raise

    # -- the driver's part ------------------------------------------------

    @abstractmethod
    def _control(self, fd: int, old: Registration | None, new: Registration | None) -> None:
        """Make the kernel watch ``fd`` as ``new`` says (None: stop watching).

        ``old`` is what the kernel watches now (None: nothing). This is the
        only place a driver changes kernel state for an fd; if it raises, the
        kernel's view must be as it was.
        """

    @abstractmethod
    def _wait(self, timeout: float | None) -> Iterable[tuple[int, int]]:
        """Wait up to ``timeout`` seconds (None: forever, 0: not at all).

        Return ``(fd, event)`` pairs, ``event`` in the kernel's own flags,
        which :meth:`_translate` turns into Interest bits. May return early
        and may include fds that are no longer registered; the base class
        filters and re-waits.
        """

    def _translate(self, event: int) -> int:
        """Turn a kernel event value from :meth:`_wait` into Interest bits.

        Hang-up and error conditions must map to readiness for both
        directions (the base class keeps only what was registered). Results
        are cached per distinct value. The default is the identity.
        """
        return event

    @abstractmethod
    def _close(self) -> None:
        """Release the driver's kernel object."""

    # -- registrations -----------------------------------------------------

    def register(
        self,
        fileobj: FileObject,
        interest: Interest | int,
        data: Any = None,
        *,
        trigger: Trigger = Trigger.LEVEL,
    ) -> Registration:
        """Start watching ``fileobj`` for ``interest``; return the registration.

        Raises KeyError if the fd is already registered, ValueError/TypeError
        for a bad file object, interest or trigger, and OSError(EBADF) if the
        fd is not open.
        """
        self._check_usable()
        fd = fileobj_to_fd(fileobj)
        mask = check_interest(interest)
        self._check_trigger(trigger)
        if fd in self._map:
            raise KeyError(f"{fileobj!r} (fd {fd}) is already registered")
        if fd == self._waker_fd:
            raise ValueError(f"fd {fd} is this multiplexer's own wakeup fd")
        new = Registration(fileobj, fd, mask, data, trigger)
        self._control(fd, None, new)
        self._map[fd] = new
        self._want[fd] = int(mask)
        return new

    def modify(
        self,
        fileobj: FileObject,
        interest: Interest | int,
        data: Any = None,
        *,
        trigger: Trigger = Trigger.LEVEL,
    ) -> Registration:
        """Replace the interest, data and trigger of a registered fd.

        Re-arms a disarmed ONESHOT registration. Raises KeyError if the fd is
        not registered; on any error the previous registration stays intact.
        """
        self._check_usable()
        old = self._lookup(fileobj)
        mask = check_interest(interest)
        self._check_trigger(trigger)
        new = Registration(fileobj, old.fd, mask, data, trigger)
        armed = self._want[old.fd] != 0
        self._control(old.fd, old if armed else None, new)
        self._map[old.fd] = new
        self._want[old.fd] = int(mask)
        return new

    def unregister(self, fileobj: FileObject) -> Registration:
        """Stop watching ``fileobj`` and return its registration.

        Works after the fd was closed (pass the same object, or the fd
        number). Raises KeyError if it is not registered.
        """
        self._check_usable()
        old = self._lookup(fileobj)
        del self._map[old.fd]
        armed = self._want.pop(old.fd) != 0
        self._control(old.fd, old if armed else None, None)
        return old

    def get(self, fileobj: FileObject) -> Registration | None:
        """Return the registration of ``fileobj``, or None if it has none."""
        self._check_usable()
        try:
            return self._lookup(fileobj)
        except KeyError:
            return None

    def __getitem__(self, fileobj: FileObject) -> Registration:
        """Return the registration of ``fileobj``; KeyError if it has none."""
        self._check_usable()
        return self._lookup(fileobj)

    def __contains__(self, fileobj: object) -> bool:
        """Whether ``fileobj`` (an fd or file object) is registered."""
        if self._closed:
            return False
        try:
            self._lookup(fileobj)  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            return False
        return True

    def __len__(self) -> int:
        """The number of registered fds (0 once closed)."""
        return len(self._map)

    def __iter__(self) -> Iterator[Registration]:
        """Iterate over a snapshot of the registrations."""
        return iter(list(self._map.values()))

    # -- waiting -----------------------------------------------------------

    def poll(self, timeout: float | None = None) -> list[Event]:
        """Wait for readiness and return the ready events.

        ``None`` waits until an event or :meth:`wakeup`; ``0`` or less never
        blocks; a positive timeout never returns early with nothing to report.
        """
        return self._collect(timeout, True)

    def ready(self, timeout: float | None = None) -> list[tuple[int, int, Any]]:
        """The wait of :meth:`poll`, returning plain ``(fd, mask, data)`` tuples.

        ``mask`` is an int (1 read, 2 write, 3 both) rather than an
        :class:`Interest`: the cheaper form for an event loop, which dispatches
        on ``data`` and compares masks with ints.
        """
        return self._collect(timeout, False)

    def _collect(self, timeout: float | None, as_events: bool) -> list[Any]:
        # The wait of poll() (Event tuples) and ready() (plain tuples).
        self._check_usable()
        deadline: float | None = None
        remaining: float | None
        if timeout is None:
            remaining = None
        elif timeout <= 0:
            remaining = 0.0
        else:
            remaining = float(timeout)
            if remaining == math.inf:
                remaining = None
            elif remaining > 0:
                deadline = time.monotonic() + remaining
            else:
                raise ValueError(f"timeout must be a number of seconds, not {timeout!r}")
        events: list[Any] = []
        append = events.append
        new_event = tuple.__new__
        want_of = self._want
        registrations = self._map
        ev_masks = self._ev_masks
        emulate_oneshot = self.emulate_oneshot
        # ready() without one-shot emulation: the loop below, in C.
        collect = None if as_events or emulate_oneshot else _collect_ready
        while True:
            if remaining is not None and remaining > MAX_WAIT:
                remaining = MAX_WAIT
            pairs = self._wait(remaining)
            if collect is not None:
                woken = collect(
                    pairs, want_of, ev_masks, registrations, self._translate, self._waker_fd, events
                )
                if woken:
                    self._waker.drain()
                    self._woken = True
            else:
                for fd, ev in pairs:
                    want = want_of.get(fd)
                    if want is None:
                        if fd == self._waker_fd:
                            self._waker.drain()
                            self._woken = True
                        continue
                    mask = ev_masks.get(ev)
                    if mask is None:
                        mask = ev_masks[ev] = self._translate(ev)
                    mask &= want
                    if not mask:
                        continue
                    reg = registrations[fd]
                    if as_events:
                        append(new_event(Event, (fd, MASKS[mask], reg.data)))
                    else:
                        append((fd, mask, reg.data))
                    if emulate_oneshot and reg.trigger is Trigger.ONESHOT:
                        self._control(fd, reg, None)
                        want_of[fd] = 0
            if events or self._woken or remaining == 0.0:
                self._woken = False
                return events
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return events

    def wakeup(self) -> None:
        """End a blocked or the next :meth:`poll` early; safe from any thread."""
        self._check_usable()
        self._waker.wake()

    def fileno(self) -> int:
        """An fd that becomes readable when :meth:`poll` has something to do.

        For embedding in a host's event loop: wait until it is readable, then
        call ``poll(0)``. Call :meth:`submit` before each such wait. Only
        drivers whose capabilities say ``pollable_fd`` have one; the others
        raise ``io.UnsupportedOperation``.
        """
        raise io.UnsupportedOperation(
            f"the {self.name} driver has no single pollable fd (capability pollable_fd)"
        )

    def completion_port(self) -> Any:
        """The driver's completion operations (:class:`iomux.completion.CompletionPort`).

        Only drivers whose capabilities say ``completion`` have one (io_uring):
        the iomux event loop moves stream connections' bytes through it. The
        others raise ``io.UnsupportedOperation``.
        """
        raise io.UnsupportedOperation(
            f"the {self.name} driver has no completion port (capability completion)"
        )

    def submit(self) -> None:
        """Hand queued registration changes to the kernel now, without waiting.

        Drivers that batch changes into the next wait (io_uring) need this
        before a host waits on :meth:`fileno` instead of calling
        :meth:`poll`; for the others it does nothing.
        """
        self._check_usable()

    # -- lifetime ----------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    def close(self) -> None:
        """Release the kernel object and forget every registration; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._map.clear()
        self._want.clear()
        try:
            self._close()
        finally:
            self._waker.close()

    def __enter__(self) -> Multiplexer:
        """Return self; the ``with`` block closes the multiplexer on exit."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the multiplexer."""
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._map)} registered"
        return f"<{type(self).__name__} {self.name} {state}>"

    # -- helpers -----------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise MultiplexerClosed(f"this {self.name} multiplexer is closed")
        if self._fork_gen != _fork_generation:
            raise ForkedError(self.name, self._pid, os.getpid())

    def _check_trigger(self, trigger: object) -> None:
        if not isinstance(trigger, Trigger):
            raise TypeError(f"trigger must be an iomux.Trigger, not {trigger!r}")
        supported = self.capabilities.triggers
        if trigger not in supported:
            names = ", ".join(sorted(str(t) for t in supported))
            raise UnsupportedTrigger(self.name, trigger, names)

    def _lookup(self, fileobj: FileObject) -> Registration:
        try:
            fd = fileobj_to_fd(fileobj)
        except ValueError:
            # A closed file object reports fd -1 (or raises): find it by identity.
            for reg in self._map.values():
                if reg.fileobj is fileobj:
                    return reg
            raise
        try:
            return self._map[fd]
        except KeyError:
            raise KeyError(f"{fileobj!r} (fd {fd}) is not registered") from None
