"""A thin, batch-shaped Python layer over io_uring (the compiled ``_liburing`` module).

:class:`Ring` owns one io_uring instance.  Operations are *queued* in Python
as fixed-size records (see :data:`RECORD`) and nothing reaches the kernel
until :meth:`Ring.enter`, which in **one** C call turns every queued record
into an SQE, submits, waits, and copies every available completion into a
flat buffer of :data:`CQE` records::

    ring = Ring()
    ring.poll_add(sock.fileno(), POLLIN, user_data=(gen << 32) | fd)
    for user_data, res, flags in CQE.iter_unpack(ring.enter(1, 50_000_000)):
        ...

``user_data`` is the caller's 64-bit tag (values from :data:`USER_DATA_MAX`
up are reserved).  Putting a generation number in it, e.g.
``(generation << 32) | fd``, lets a caller drop completions that arrive for
a registration it has since replaced.

A multishot operation (poll, accept, recv) keeps reporting with ``F_MORE``
set; a completion without ``F_MORE`` is its last one (cancelled, failed,
out of buffers, or ended by the kernel, e.g. when the completion queue
overflowed), so a caller that still wants it queues it again.

The wait never ends early on its own: before the timeout, :meth:`Ring.enter`
returns no completions only after a :meth:`Ring.wake` call.  Signals are
handled as in PEP 475: handlers run, and if none raises the wait resumes for
the time left.

A ring is not thread-safe, except :meth:`Ring.wake`.  Where the kernel takes
``IORING_SETUP_SINGLE_ISSUER``, the ring is bound to the first thread that
calls :meth:`Ring.enter`.  After ``fork()`` the child must not use the
parent's ring: every method raises :class:`~iomux.errors.ForkedError` there,
and :meth:`Ring.close` in the child only drops the child's copies.

:func:`probe` tells whether io_uring works here, and if not why, in words a
user can act on.  The environment variable ``IOMUX_URING_FORCE_FAIL``
(``ENOSYS``, ``EPERM``, ``disabled``, ``nobuild`` or ``flags``) makes ring
creation behave as if that failure happened, for tests.
"""

from __future__ import annotations

import errno
import functools
import importlib
import io
import mmap
import os
import select
import socket
import struct
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from iomux.completion import EVENT_RECORD, SEND_PAIR
from iomux.errors import ForkedError, MultiplexerClosed

__all__ = [
    "BUFFER_SHIFT",
    "BUILD_ERROR",
    "COMPLETION_TAG",
    "CQE",
    "CQE_SIZE",
    "FEATURES",
    "F_BUFFER",
    "F_MORE",
    "F_SOCK_NONEMPTY",
    "LEVEL_IN",
    "LEVEL_OUT",
    "NOBUILD_REASON",
    "OP_ACCEPT",
    "OP_ACCEPT_MULTISHOT",
    "OP_CANCEL",
    "OP_CANCEL_FD",
    "OP_CLOSE",
    "OP_NOP",
    "OP_POLL_ADD",
    "OP_POLL_MULTISHOT",
    "OP_POLL_REMOVE",
    "OP_POLL_UPDATE",
    "OP_RECV",
    "OP_RECV_MULTISHOT",
    "OP_SEND",
    "POLLERR",
    "POLLHUP",
    "POLLIN",
    "POLLNVAL",
    "POLLOUT",
    "POLLPRI",
    "POLLRDHUP",
    "RECORD",
    "RECORD_SIZE",
    "USER_DATA_MAX",
    "VERIFY",
    "BufferGroup",
    "Ring",
    "RingSetupError",
    "describe",
    "disabled_features",
    "probe",
    "versions",
]

_lib: Any
_ffi: Any
BUILD_ERROR: str | None
try:
    _mod: Any = importlib.import_module("iomux.drivers._liburing")
except ImportError as _exc:
    _lib = _ffi = None
    BUILD_ERROR = f"{type(_exc).__name__}: {_exc}"
else:
    _lib, _ffi = _mod.lib, _mod.ffi
    BUILD_ERROR = None


def _const(name: str, default: int) -> int:
    return int(getattr(_lib, name)) if _lib is not None else default


# --- the record formats ---------------------------------------------------

#: One queued operation (40 bytes): op, sqe_flags, buf_group, fd, arg, arg2,
#: user_data, addr, addr2.  See ``struct iomux_op`` in ``_uring_helper.c``.
RECORD = struct.Struct("=BBHiIIQQQ")
RECORD_SIZE = RECORD.size
_pack_into = RECORD.pack_into
#: One completion as returned by :meth:`Ring.enter` (16 bytes): user_data, res, flags.
CQE = struct.Struct("=QiI")
CQE_SIZE = CQE.size

#: One stream record (24 bytes): kind, slot, argument, sends before it, length (SEND).
#: See ``_uring_streams.c``.
SOP = struct.Struct("=IIQII")
#: One stream event (16 bytes): slot, kind, result, offset (the completion
#: contract's packed event record).
SEV = EVENT_RECORD


def _check_layouts() -> None:
    """The record formats here must be the C helper's (one definition, checked both ways)."""
    if _lib is None:
        return
    expected = {
        "IOMUX_OP_SIZE": RECORD.size,
        "IOMUX_OP_OFF_USER_DATA": struct.calcsize("=BBHiII"),
        "IOMUX_OP_OFF_ADDR2": struct.calcsize("=BBHiIIQQ"),
        "IOMUX_CQE_SIZE": CQE.size,
        "IOMUX_SOP_SIZE": SOP.size,
        "IOMUX_SOP_OFF_SENDS_BEFORE": struct.calcsize("=IIQ"),
        "IOMUX_SEV_SIZE": SEV.size,
        "IOMUX_SEV_OFF_KIND": struct.calcsize("=I"),
        "IOMUX_SEV_OFF_RES": struct.calcsize("=II"),
        "IOMUX_SEV_OFF_OFF": struct.calcsize("=IIi"),
        "IOMUX_SEND_PAIR_SIZE": SEND_PAIR.size,
        "IOMUX_SEND_PAIR_OFF_LEN": struct.calcsize("=I"),
    }
    wrong = {k: (int(getattr(_lib, k)), v) for k, v in expected.items() if getattr(_lib, k) != v}
    if wrong:
        raise ImportError(
            f"iomux's io_uring extension does not match drivers/_uring.py (C, Python): {wrong}; "
            "rebuild it (pip install -e . again)"
        )


_check_layouts()

OP_NOP = _const("IOMUX_OP_NOP", 0)
OP_POLL_ADD = _const("IOMUX_OP_POLL_ADD", 1)
OP_POLL_MULTISHOT = _const("IOMUX_OP_POLL_MULTISHOT", 2)
OP_POLL_UPDATE = _const("IOMUX_OP_POLL_UPDATE", 3)
OP_POLL_REMOVE = _const("IOMUX_OP_POLL_REMOVE", 4)
OP_CANCEL = _const("IOMUX_OP_CANCEL", 5)
OP_CANCEL_FD = _const("IOMUX_OP_CANCEL_FD", 6)
OP_ACCEPT = _const("IOMUX_OP_ACCEPT", 7)
OP_ACCEPT_MULTISHOT = _const("IOMUX_OP_ACCEPT_MULTISHOT", 8)
OP_RECV = _const("IOMUX_OP_RECV", 9)
OP_RECV_MULTISHOT = _const("IOMUX_OP_RECV_MULTISHOT", 10)
OP_SEND = _const("IOMUX_OP_SEND", 11)
OP_CLOSE = _const("IOMUX_OP_CLOSE", 12)
OP_OPENAT = _const("IOMUX_OP_OPENAT", 13)
OP_READ = _const("IOMUX_OP_READ", 14)
OP_WRITE = _const("IOMUX_OP_WRITE", 15)
OP_FSYNC = _const("IOMUX_OP_FSYNC", 16)
OP_STATX = _const("IOMUX_OP_STATX", 17)
OP_SPLICE = _const("IOMUX_OP_SPLICE", 18)
#: Set in the user_data of the completion port's file operations: their
#: completions go to the port, not to readiness.
COMPLETION_TAG = 1 << 61

#: Largest user_data a caller may use; larger values are the layer's own.
USER_DATA_MAX = _const("IOMUX_UD_RESERVED", 0xFFFFFFFFFFFFFF00) - 1

# --- kernel constants -----------------------------------------------------

F_BUFFER = _const("IORING_CQE_F_BUFFER", 1)
F_MORE = _const("IORING_CQE_F_MORE", 2)
F_SOCK_NONEMPTY = _const("IORING_CQE_F_SOCK_NONEMPTY", 4)
BUFFER_SHIFT = _const("IORING_CQE_BUFFER_SHIFT", 16)
POLLIN = _const("POLLIN", select.POLLIN)
POLLPRI = _const("POLLPRI", select.POLLPRI)
POLLOUT = _const("POLLOUT", select.POLLOUT)
POLLERR = _const("POLLERR", select.POLLERR)
POLLHUP = _const("POLLHUP", select.POLLHUP)
POLLNVAL = _const("POLLNVAL", select.POLLNVAL)
POLLRDHUP = _const("POLLRDHUP", 0x2000)

_POLL_ADD_MULTI = _const("IORING_POLL_ADD_MULTI", 1)
_POLL_UPDATE_EVENTS = _const("IORING_POLL_UPDATE_EVENTS", 2)
_POLL_UPDATE_USER_DATA = _const("IORING_POLL_UPDATE_USER_DATA", 4)
_CANCEL_ALL = _const("IORING_ASYNC_CANCEL_ALL", 1)
_SKIP_SUCCESS = _const("IOSQE_CQE_SKIP_SUCCESS", 64)
_ST_WOKEN = _const("IOMUX_ST_WOKEN", 1)
_ST_TIMED_OUT = _const("IOMUX_ST_TIMED_OUT", 2)
_ST_MORE = _const("IOMUX_ST_MORE", 4)
_ENTER_RECHECK = _const("IOMUX_ENTER_RECHECK", 1)
_ENTER_NEW_BATCH = _const("IOMUX_ENTER_NEW_BATCH", 2)
_ST_STREAMS_FULL = _const("IOMUX_ST_STREAMS_FULL", 8)
#: Bits of a level-triggered poll's user_data (see :meth:`Ring.poll_level`).
LEVEL_IN = _const("IOMUX_UD_LEVEL_IN", 1 << 56)
LEVEL_OUT = _const("IOMUX_UD_LEVEL_OUT", 1 << 57)
#: A bit of a poll's user_data: its reports are checked with poll(2) before
#: they are handed out, and one no longer ready comes out with res 0 (a
#: wake-up's report may be posted after the data was read). Level polls
#: are always checked.
VERIFY = _const("IOMUX_UD_VERIFY", 1 << 58)

_SETUP_FLAG_NAMES = (
    "SUBMIT_ALL",
    "SINGLE_ISSUER",
    "DEFER_TASKRUN",
    "COOP_TASKRUN",
    "TASKRUN_FLAG",
    "CQSIZE",
    "CLAMP",
    "R_DISABLED",
)
_FEATURE_NAMES = ("NODROP", "EXT_ARG", "FAST_POLL", "CQE_SKIP", "NATIVE_WORKERS")
_PROBED_OPS = (
    "POLL_ADD",
    "POLL_REMOVE",
    "ASYNC_CANCEL",
    "ACCEPT",
    "SEND",
    "RECV",
    "CLOSE",
    "OPENAT",
    "READ",
    "WRITE",
    "FSYNC",
    "STATX",
    "SPLICE",
)

_FORCE_ENV = "IOMUX_URING_FORCE_FAIL"
#: Ring features not to use even where the kernel has them, comma-separated
#: (to run a suite on the fallback): see FEATURES.
_DISABLE_ENV = "IOMUX_URING_DISABLE"
#: What IOMUX_URING_DISABLE can name: ``registered_ring`` (the loop's thread
#: enters its ring by an index registered with the kernel, Linux 5.18+,
#: instead of by fd), ``incremental_buffers`` and ``recv_bundles`` (see
#: :class:`StreamPort`).
FEATURES = ("registered_ring", "incremental_buffers", "recv_bundles")


def disabled_features() -> frozenset[str]:
    """The ring features IOMUX_URING_DISABLE turns off (an unknown name is an error)."""
    names = frozenset(n.strip() for n in os.environ.get(_DISABLE_ENV, "").split(",") if n.strip())
    unknown = names - set(FEATURES)
    if unknown:
        raise ValueError(
            f"{_DISABLE_ENV}={os.environ[_DISABLE_ENV]!r}: unknown feature(s) "
            f"{', '.join(sorted(unknown))}; known: {', '.join(FEATURES)}"
        )
    return names


_FORCE_VALUES = ("ENOSYS", "EPERM", "disabled", "nobuild", "flags")
_SYSCTL = "/proc/sys/kernel/io_uring_disabled"
_SYSCTL_GROUP = "/proc/sys/kernel/io_uring_group"

NOBUILD_REASON = (
    "iomux was installed without liburing's headers (liburing 2.3 or newer); "
    "install them (Debian/Ubuntu: apt-get install liburing-dev) and reinstall iomux"
)

ReadableBuffer = bytes | bytearray | memoryview
_EMPTY = memoryview(b"")
_NULL: Any = _ffi.NULL if _ffi is not None else None


class RingSetupError(OSError):
    """io_uring could not be set up here; :attr:`reason` says why, for a user."""

    def __init__(self, err: int, reason: str) -> None:
        super().__init__(err, reason)
        self.reason = reason


# --- diagnosis -------------------------------------------------------------


def _forced() -> str | None:
    value = os.environ.get(_FORCE_ENV) or None
    if value is not None and value not in _FORCE_VALUES:
        raise ValueError(
            f"{_FORCE_ENV}={value!r} is not one of {', '.join(_FORCE_VALUES)} (or empty)"
        )
    return value


def _kernel_version() -> tuple[int, int]:
    release = os.uname().release
    parts = release.split("-", 1)[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def _read_sysctl(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _reason(err: int, forced: str | None) -> str:
    """Explain a failed io_uring_setup in words a user can act on."""
    release = os.uname().release
    if err == errno.ENOSYS:
        # The sysctl exists on kernels built with io_uring (6.6+); without it
        # both causes remain possible.  The forced failure plays a kernel
        # without io_uring.
        if forced == "ENOSYS" or not os.path.exists(_SYSCTL):
            return (
                f"io_uring_setup failed with ENOSYS: this kernel ({release}) lacks io_uring "
                "(it needs Linux 5.19 or newer built with CONFIG_IO_URING=y), or a seccomp "
                "profile blocks the io_uring system calls"
            )
        return (
            f"io_uring_setup failed with ENOSYS although this kernel ({release}) has io_uring: "
            "the system calls are most likely blocked by a seccomp profile (Docker's and "
            "containerd's default profiles block them); run with a profile that allows "
            "io_uring_setup, io_uring_enter and io_uring_register, or use another backend"
        )
    if err == errno.EPERM:
        value = "2" if forced == "disabled" else _read_sysctl(_SYSCTL)
        if value == "2":
            return (
                "io_uring is disabled by the sysctl kernel.io_uring_disabled = 2; "
                "enable it with `sysctl -w kernel.io_uring_disabled=0` (as root), "
                "or use another backend"
            )
        if value == "1":
            group = _read_sysctl(_SYSCTL_GROUP) or "-1"
            return (
                "io_uring is restricted by the sysctl kernel.io_uring_disabled = 1 to "
                f"privileged processes and members of kernel.io_uring_group (gid {group}); "
                "add this user to that group, or enable io_uring for everyone with "
                "`sysctl -w kernel.io_uring_disabled=0`"
            )
        return (
            "io_uring_setup failed with EPERM although kernel.io_uring_disabled is "
            f"{value if value is not None else 'absent'}: the system calls are most likely "
            "blocked by a seccomp profile (e.g. a container runtime's default profile); run "
            "with a profile that allows io_uring_setup, io_uring_enter and "
            "io_uring_register, or use another backend"
        )
    if err == errno.ENOMEM:
        return (
            "io_uring_setup failed with ENOMEM: kernels before 5.12 charge rings to the "
            "locked-memory limit; raise it (ulimit -l) or use another backend"
        )
    if err in (errno.EMFILE, errno.ENFILE):
        return f"io_uring_setup failed: {os.strerror(err)} (raise the open-file limit)"
    return f"io_uring_setup failed with {errno.errorcode.get(err, err)}: {os.strerror(err)}"


def versions() -> dict[str, str]:
    """Kernel release and liburing version (from the build-time header)."""
    liburing = "not built" if _lib is None else _ffi.string(_lib.iomux_liburing_version()).decode()
    return {"kernel": os.uname().release, "liburing": liburing}


def probe() -> str | None:
    """Return None when io_uring works here, else the reason it does not, for a user."""
    try:
        disabled_features()
        ring = Ring(entries=4, cq_entries=8)
    except RingSetupError as exc:
        return exc.reason
    except ValueError as exc:
        return str(exc)
    try:
        ring.nop(1)
        seen = [ud for ud, _, _ in CQE.iter_unpack(ring.enter(1, 1_000_000_000))]
        if seen != [1]:
            return "io_uring rings can be created here, but a NOP did not complete"
    except OSError as exc:
        return f"io_uring rings can be created here, but entering one fails: {exc}"
    finally:
        ring.close()
    return None


def describe() -> dict[str, object]:
    """What ``iomux info`` shows: availability, reason, versions, flags that won."""
    reason = probe()
    out: dict[str, object] = {"available": reason is None, "reason": reason, **versions()}
    if reason is None:
        with Ring() as ring:  # default sizes: what a driver would get
            out.update(ring.info())
            port = ring.stream_port()
            ring.nop(1)
            ring.enter(1, 1_000_000_000)  # the first enter binds (and registers) the ring
            # The optional features every ring of this thread uses here.
            out["ring_features"] = ["registered_ring"] if ring.registered_fd else []
            # The optional features the loop's stream connections use here.
            out["stream_features"] = [
                name
                for name, used in (
                    ("incremental_buffers", port.incremental),
                    ("recv_bundles", port.bundles),
                )
                if used
            ]
    return out


# --- the ring -------------------------------------------------------------

_live: weakref.WeakSet[Ring] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for ring in list(_live):
        ring._forked = True
        ring._usable = False
        ring._wake_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _setup_candidates(single_issuer: bool) -> list[int]:
    """Setup flag sets to try, richest first; only flags the header knows."""
    lib = _lib
    sizing = lib.IOMUX_SETUP_CQSIZE | lib.IOMUX_SETUP_CLAMP
    out = []
    if single_issuer and lib.IOMUX_SETUP_SINGLE_ISSUER and lib.IOMUX_SETUP_DEFER_TASKRUN:
        out.append(
            lib.IOMUX_SETUP_SUBMIT_ALL
            | lib.IOMUX_SETUP_SINGLE_ISSUER
            | lib.IOMUX_SETUP_DEFER_TASKRUN
            | lib.IOMUX_SETUP_TASKRUN_FLAG
            | lib.IOMUX_SETUP_R_DISABLED
            | sizing
        )
    if lib.IOMUX_SETUP_COOP_TASKRUN:
        out.append(
            lib.IOMUX_SETUP_SUBMIT_ALL
            | lib.IOMUX_SETUP_COOP_TASKRUN
            | lib.IOMUX_SETUP_TASKRUN_FLAG
            | sizing
        )
    out += [sizing, 0]
    return [int(f) for f in out]


def _flag_names(flags: int) -> tuple[str, ...]:
    return tuple(n for n in _SETUP_FLAG_NAMES if flags & int(getattr(_lib, "IOMUX_SETUP_" + n)))


class Ring:
    """One io_uring instance with batched submission and bulk completion copy-out.

    ``entries`` sizes the submission queue (a full queue is submitted, never
    dropped), ``cq_entries`` the completion queue, ``capacity`` the number of
    completions one :meth:`enter` can return (the rest come with the next
    call).  ``single_issuer`` lets the ring use ``IORING_SETUP_SINGLE_ISSUER``
    and ``DEFER_TASKRUN``, which bind it to the first thread that enters it.
    """

    def __init__(
        self,
        entries: int = 256,
        *,
        cq_entries: int = 4096,
        capacity: int = 1024,
        single_issuer: bool = True,
    ) -> None:
        self._r: Any = None
        self._usable = False
        self._forked = False
        self._wake_fd = -1
        self._wake_lock = threading.Lock()
        self._pid = os.getpid()
        if not (0 < entries <= 32768 and 0 < cq_entries <= 65536 and 0 < capacity <= 1 << 20):
            raise ValueError(
                "entries must be in 1..32768, cq_entries in 1..65536, capacity in 1..1048576"
            )
        forced = _forced()
        if forced == "nobuild" or _lib is None:
            detail = "" if forced == "nobuild" else f" ({BUILD_ERROR})"
            raise RingSetupError(errno.ENOPKG, NOBUILD_REASON + detail)
        if forced in ("ENOSYS", "EPERM", "disabled"):
            err = errno.ENOSYS if forced == "ENOSYS" else errno.EPERM
            raise RingSetupError(err, _reason(err, forced))

        lib, ffi = _lib, _ffi
        self._lib = lib
        register_fd = int("registered_ring" not in disabled_features())
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        errp = ffi.new("int *")
        #: (flag names, errno name or "ok") for each setup attempt, in order.
        self.setup_attempts: list[tuple[tuple[str, ...], str]] = []
        plain = int(lib.IOMUX_SETUP_CQSIZE | lib.IOMUX_SETUP_CLAMP)
        for flags in _setup_candidates(single_issuer):
            if forced == "flags" and flags & ~plain:
                self.setup_attempts.append((_flag_names(flags), "EINVAL (forced)"))
                continue
            r = lib.iomux_ring_new(entries, cq_entries, flags, register_fd, self._wake_fd, errp)
            if r != ffi.NULL:
                self.setup_attempts.append((_flag_names(flags), "ok"))
                break
            err = errp[0]
            self.setup_attempts.append((_flag_names(flags), errno.errorcode.get(err, str(err))))
            if err != errno.EINVAL:
                os.close(self._wake_fd)
                self._wake_fd = -1
                raise RingSetupError(err, _reason(err, forced))
        else:
            os.close(self._wake_fd)
            self._wake_fd = -1
            raise RingSetupError(
                errno.EINVAL,
                "io_uring_setup rejected every flag combination tried; this kernel is "
                "probably too old (iomux needs Linux 5.19 or newer)",
            )
        self._r = r
        self._usable = True
        #: The setup flags the kernel accepted, and their names.
        self.setup_flags = flags
        self.setup_flag_names = _flag_names(flags)
        #: IORING_FEAT_* bits the kernel reported.
        self.features = int(lib.iomux_ring_features(r))
        self.sq_entries = int(lib.iomux_ring_sq_entries(r))
        self.cq_entries = int(lib.iomux_ring_cq_entries(r))
        self.capacity = capacity

        self._opcap = max(64, self.sq_entries)
        self._ops = ffi.new("char[]", self._opcap * RECORD_SIZE)
        self._opsbuf = memoryview(ffi.buffer(self._ops))
        self._nops = 0
        self._out = ffi.new("char[]", capacity * CQE_SIZE)
        self._outview = memoryview(ffi.buffer(self._out))
        self._status = ffi.new("int64_t[8]")
        self._c_enter = lib.iomux_enter
        self._streams: StreamPort | None = None
        self._sends: dict[int, tuple[object, Any]] = {}
        self._groups: dict[int, BufferGroup] = {}
        self._dirty: list[BufferGroup] = []
        self._retired: list[object] = []
        _live.add(self)

    # --- state -----------------------------------------------------------

    def _unusable(self) -> Exception:
        if self._forked:
            return ForkedError("io_uring", self._pid, os.getpid())
        return MultiplexerClosed("this io_uring ring is closed")

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (in this process)."""
        return self._r is None

    @property
    def pid(self) -> int:
        """The process that created the ring, the only one that may use it."""
        return self._pid

    def fileno(self) -> int:
        """The ring's file descriptor (for information: never poll or close it)."""
        if not self._usable:
            raise self._unusable()
        return int(self._lib.iomux_ring_fd(self._r))

    @property
    def registered_fd(self) -> bool:
        """Whether the ring is entered by a registered index rather than by its fd.

        The thread that first enters a single-issuer ring registers it
        (Linux 5.18+; not if ``IOMUX_URING_DISABLE`` names
        ``registered_ring``), saving the kernel a file lookup per system call.
        """
        return self._r is not None and bool(self._lib.iomux_ring_registered(self._r))

    @property
    def pending(self) -> int:
        """Records queued in Python and not yet handed to the kernel."""
        return self._nops

    @property
    def woken(self) -> bool:
        """The last :meth:`enter` consumed a :meth:`wake`."""
        return bool(self._status[0] & _ST_WOKEN)

    @property
    def timed_out(self) -> bool:
        """The last :meth:`enter` waited until its timeout without a completion."""
        return bool(self._status[0] & _ST_TIMED_OUT)

    @property
    def more(self) -> bool:
        """The last :meth:`enter` filled its buffer and more completions are ready."""
        return bool(self._status[0] & _ST_MORE)

    def info(self) -> dict[str, object]:
        """Versions, setup flags that won, kernel features and supported operations."""
        if not self._usable:
            raise self._unusable()
        lib, ffi = self._lib, _ffi
        supported = ffi.new("unsigned char[256]")
        n = lib.iomux_ring_probe(self._r, supported, 256)
        ops = {
            name: bool(n > 0 and supported[getattr(lib, "IORING_OP_" + name)])
            for name in _PROBED_OPS
        }
        kver = _kernel_version()
        return {
            **versions(),
            "setup_flags": list(self.setup_flag_names),
            "setup_attempts": [(list(f), r) for f, r in self.setup_attempts],
            "features": [
                n for n in _FEATURE_NAMES if self.features & int(getattr(lib, "IORING_FEAT_" + n))
            ],
            "sq_entries": self.sq_entries,
            "cq_entries": self.cq_entries,
            "ops": ops,
            "multishot_poll": kver >= (5, 13),
            "multishot_accept": kver >= (5, 19),
            "multishot_recv": kver >= (6, 0),
            "cancel_fd": kver >= (5, 19),
            "buffer_ring": kver >= (5, 19),
        }

    # --- queueing (nothing reaches the kernel before enter()) -------------

    def _push(
        self,
        op: int,
        sqe_flags: int,
        group: int,
        fd: int,
        arg: int,
        arg2: int,
        user_data: int,
        addr: int = 0,
        addr2: int = 0,
    ) -> None:
        n = self._nops
        if n == self._opcap or not self._usable or user_data > USER_DATA_MAX:
            self._make_room(user_data)
        try:
            _pack_into(
                self._opsbuf,
                n * RECORD_SIZE,
                op,
                sqe_flags,
                group,
                fd,
                arg,
                arg2,
                user_data,
                addr,
                addr2,
            )
        except struct.error as exc:
            raise ValueError(f"operation argument out of range: {exc}") from None
        self._nops = n + 1

    def _make_room(self, user_data: int) -> None:
        """The slow path of queueing: errors, or a full record buffer."""
        if not self._usable:
            raise self._unusable()
        if user_data > USER_DATA_MAX:
            raise ValueError(f"user_data {user_data:#x} is above USER_DATA_MAX (reserved)")
        if self._nops == self._opcap:
            self._grow(self._nops + 1)

    def _grow(self, need: int) -> None:
        cap = self._opcap
        while cap < need:
            cap *= 2
        ops = _ffi.new("char[]", cap * RECORD_SIZE)
        _ffi.memmove(ops, self._ops, self._nops * RECORD_SIZE)
        self._ops, self._opsbuf, self._opcap = ops, memoryview(_ffi.buffer(ops)), cap

    def queue(self, records: ReadableBuffer) -> None:
        """Queue raw :data:`RECORD`-packed operations (a multiple of 40 bytes).

        The caller keeps any memory a SEND record points to alive until its
        completion; :meth:`send` does that by itself.
        """
        if not self._usable:
            raise self._unusable()
        data = memoryview(records).cast("B")
        if len(data) % RECORD_SIZE:
            raise ValueError(f"records must be a multiple of {RECORD_SIZE} bytes")
        count = len(data) // RECORD_SIZE
        if self._nops + count > self._opcap:
            self._grow(self._nops + count)
        start = self._nops * RECORD_SIZE
        self._opsbuf[start : start + len(data)] = data
        self._nops += count

    def nop(self, user_data: int, *, skip_success: bool = False) -> None:
        """Queue a no-op; it completes with res 0."""
        self._push(OP_NOP, _SKIP_SUCCESS if skip_success else 0, 0, -1, 0, 0, user_data)

    def poll_add(self, fd: int, mask: int, user_data: int) -> None:
        """Queue a one-shot poll: one completion (res = ready mask) when ``fd`` is ready."""
        # _push() inlined: this is the per-event call of level-triggered use.
        n = self._nops
        if n == self._opcap or not self._usable or user_data > USER_DATA_MAX:
            self._make_room(user_data)
        try:
            _pack_into(self._opsbuf, n * 40, OP_POLL_ADD, 0, 0, fd, mask, 0, user_data, 0, 0)
        except struct.error as exc:
            raise ValueError(f"operation argument out of range: {exc}") from None
        self._nops = n + 1

    def poll_level(self, fd: int, mask: int, user_data: int) -> None:
        """Queue a level-triggered poll: reports while ``fd`` stays ready.

        It is a multishot poll (one completion per new wake-up, with F_MORE)
        whose reported fds :meth:`enter` with ``recheck`` checks again and
        reports again while they are ready.  ``user_data`` must have
        :data:`LEVEL_IN` and/or :data:`LEVEL_OUT` set (what to re-check
        for) and ``fd`` in its low 32 bits.
        """
        if not user_data & (LEVEL_IN | LEVEL_OUT) or user_data & 0xFFFFFFFF != fd:
            raise ValueError(
                "a level poll's user_data needs LEVEL_IN and/or LEVEL_OUT and the fd "
                "in its low 32 bits"
            )
        self._push(OP_POLL_MULTISHOT, 0, 0, fd, mask, 0, user_data)

    def poll_multishot(self, fd: int, mask: int, user_data: int) -> None:
        """Queue a multishot poll: a completion (with F_MORE) per new readiness (edge-like)."""
        self._push(OP_POLL_MULTISHOT, 0, 0, fd, mask, 0, user_data)

    def poll_update(
        self,
        old_user_data: int,
        new_user_data: int,
        mask: int,
        user_data: int,
        *,
        multishot: bool = True,
        skip_success: bool = False,
    ) -> None:
        """Queue a change of a live poll's mask and user_data.

        Keep ``multishot`` true for a multishot poll: older kernels replace
        the whole mask and silently turn the poll one-shot unless the update
        repeats ``IORING_POLL_ADD_MULTI`` (newer ones keep the poll's kind
        whatever it says, so to change the kind, remove and add).  A poll
        whose fd is still ready reports again right after the update.  The
        update's own completion (``user_data``) has res 0, or -ENOENT when the
        poll is gone (e.g. a one-shot poll that already fired).
        """
        flags = _POLL_UPDATE_EVENTS | _POLL_UPDATE_USER_DATA | (_POLL_ADD_MULTI if multishot else 0)
        self._push(
            OP_POLL_UPDATE,
            _SKIP_SUCCESS if skip_success else 0,
            0,
            -1,
            mask,
            flags,
            user_data,
            old_user_data,
            new_user_data,
        )

    def poll_remove(
        self, target_user_data: int, user_data: int, *, skip_success: bool = False
    ) -> None:
        """Queue removal of the poll tagged ``target_user_data`` (it completes with -ECANCELED)."""
        self._push(
            OP_POLL_REMOVE,
            _SKIP_SUCCESS if skip_success else 0,
            0,
            -1,
            0,
            0,
            user_data,
            target_user_data,
        )

    def cancel(
        self,
        target_user_data: int,
        user_data: int,
        *,
        match_all: bool = False,
        skip_success: bool = False,
    ) -> None:
        """Queue cancellation of the operation(s) tagged ``target_user_data``.

        Each cancelled operation completes with -ECANCELED; the cancel itself
        completes with 0, or -ENOENT if nothing matched (with ``match_all``:
        the number cancelled, 0 for none).
        """
        self._push(
            OP_CANCEL,
            _SKIP_SUCCESS if skip_success else 0,
            0,
            -1,
            _CANCEL_ALL if match_all else 0,
            0,
            user_data,
            target_user_data,
        )

    def cancel_fd(self, fd: int, user_data: int, *, skip_success: bool = False) -> None:
        """Queue cancellation of every operation on ``fd`` (kernel 5.19+).

        Call it before closing an fd: closing does not cancel ring operations.
        The cancel completes with the number cancelled (0 for none).
        """
        self._push(
            OP_CANCEL_FD, _SKIP_SUCCESS if skip_success else 0, 0, fd, _CANCEL_ALL, 0, user_data
        )

    def accept(
        self,
        fd: int,
        user_data: int,
        *,
        multishot: bool = True,
        flags: int = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
    ) -> None:
        """Queue an accept on listening socket ``fd``; res is the new connection's fd.

        Multishot (kernel 5.19+) completes once per connection with F_MORE
        until it ends (no F_MORE, e.g. on error); then queue it again.
        """
        self._push(OP_ACCEPT_MULTISHOT if multishot else OP_ACCEPT, 0, 0, fd, flags, 0, user_data)

    def recv(
        self,
        fd: int,
        group: BufferGroup | int,
        user_data: int,
        *,
        multishot: bool = True,
        flags: int = 0,
    ) -> None:
        """Queue a receive into a buffer picked by the kernel from ``group``.

        Each completion has res = bytes received (0 = end of stream) and, when
        res > 0, F_BUFFER with the buffer id in ``flags >> BUFFER_SHIFT``: read
        it with :meth:`BufferGroup.take` / :meth:`BufferGroup.view`, then give
        it back.  A multishot receive (kernel 6.0+) ends with -ENOBUFS and no
        F_MORE when the group runs out of buffers: recycle, then queue the
        receive again.
        """
        gid = group.group_id if isinstance(group, BufferGroup) else group
        self._push(OP_RECV_MULTISHOT if multishot else OP_RECV, 0, gid, fd, flags, 0, user_data)

    def send(
        self, fd: int, data: ReadableBuffer, user_data: int, *, flags: int = socket.MSG_NOSIGNAL
    ) -> None:
        """Queue a send of ``data``; res is the number of bytes sent (maybe fewer).

        The ring keeps ``data`` alive until :meth:`send_done` is called with
        the same ``user_data`` (which must be unique among sends in flight);
        call it on the send's completion.  Sends larger than 1 GiB are
        truncated to 1 GiB, like a short write.
        """
        if user_data in self._sends:
            raise ValueError(f"a send tagged {user_data:#x} is still in flight")
        cdata = _ffi.from_buffer(data)
        addr = int(_ffi.cast("uintptr_t", cdata))
        self._push(OP_SEND, 0, 0, fd, flags, min(len(cdata), 1 << 30), user_data, addr)
        self._sends[user_data] = (data, cdata)

    def send_done(self, user_data: int) -> Any:
        """Release and return the buffer of the completed send tagged ``user_data``.

        After a short send (res < length) queue ``memoryview(buf)[res:]`` again.
        """
        data, cdata = self._sends.pop(user_data)
        _ffi.release(cdata)
        return data

    def close_fd(self, fd: int, user_data: int, *, skip_success: bool = False) -> None:
        """Queue a close of ``fd`` by the kernel (cancel its operations first)."""
        self._push(OP_CLOSE, _SKIP_SUCCESS if skip_success else 0, 0, fd, 0, 0, user_data)

    # --- entering the kernel -------------------------------------------

    def enter(
        self,
        min_complete: int = 1,
        timeout_ns: int = -1,
        *,
        recheck: bool = False,
        new_batch: bool = False,
    ) -> memoryview:
        """Submit everything queued, wait, and return the completions as packed :data:`CQE`\\ s.

        Waits until ``min_complete`` (0 or 1) completions are ready, at most
        ``timeout_ns`` nanoseconds (-1: no limit, 0: do not wait).  Returns a
        view of ``16 * n`` bytes (decode with ``CQE.iter_unpack``) that stays
        valid until the next call.  An empty view means the timeout expired
        (:attr:`timed_out`) or :meth:`wake` was called (:attr:`woken`).

        With ``recheck``, every fd a level-triggered poll (:meth:`poll_level`)
        reported in an earlier call is checked again first, with one
        ``poll(2)``, and reported again if it is still ready.

        With ``new_batch``, the stream port's events start anew if every
        earlier one was handed out (:meth:`StreamPort.events`); otherwise
        new events are added after them. Only the caller that dispatches
        the events (the multiplexer's ``poll()``) passes it, never a call
        made while they are being dispatched.
        """
        if not self._usable:
            raise self._unusable()
        if self._dirty:
            self._flush_groups()
        status = self._status
        flags = _ENTER_RECHECK if recheck else 0
        streams = self._streams
        while True:
            nops = self._nops
            status[1] = 0
            nsops = nsends = 0
            if streams is None:
                sops = sends = stage = _NULL
                stage_len = 0
            else:
                if new_batch and streams._taken == streams._nev:
                    flags |= _ENTER_NEW_BATCH
                nsops = streams._n
                sops = streams._ops
                pairs = streams.sends
                nsends = len(pairs) // _PAIR_SIZE
                sends = _ffi.from_buffer(pairs) if nsends else _NULL
                stage_len = len(streams.stage)
                stage = _ffi.from_buffer(streams.stage) if stage_len else _NULL
            try:
                n = self._c_enter(
                    self._r,
                    self._ops,
                    nops,
                    self._out,
                    self.capacity,
                    min_complete,
                    timeout_ns,
                    flags,
                    sops,
                    nsops,
                    sends,
                    nsends,
                    stage,
                    stage_len,
                    status,
                )
            except OverflowError:
                raise ValueError(
                    f"enter(min_complete={min_complete!r}, timeout_ns={timeout_ns!r}): "
                    "min_complete must be 0 or 1 and timeout_ns below 2**63 (-1: no limit)"
                ) from None
            finally:
                # A signal handler may raise as soon as the call returns: the
                # count of records the kernel took lives in C memory, so the
                # queue is trimmed even then, and nothing is submitted twice.
                if nops and status[1]:
                    self._consumed(nops, int(status[1]))
                if streams is not None:
                    # Let the stage and the send pairs be resized again.
                    if stage_len:
                        _ffi.release(stage)
                    if nsends:
                        _ffi.release(sends)
                    if flags & _ENTER_NEW_BATCH:
                        streams._taken = 0
                    streams._nev = int(status[6])
                    if nsops or nsends:
                        streams._consumed(
                            nsops, int(status[3]), nsends, int(status[4]), int(status[5])
                        )
            flags &= ~_ENTER_NEW_BATCH
            if n > 0:
                return self._outview[: n * CQE_SIZE]
            if n == 0:
                return _EMPTY
            if n == -errno.EINTR:
                # PEP 475: pending signal handlers run here (and may raise);
                # then wait again for the time that is left.
                if timeout_ns > 0:
                    timeout_ns = int(status[2])
                continue
            self._fail(-n, int(status[2]))

    @property
    def streams_full(self) -> bool:
        """The last :meth:`enter` stopped because the stream events or data area were full."""
        return bool(self._status[0] & _ST_STREAMS_FULL)

    def stream_port(self, **options: Any) -> StreamPort:
        """The ring's :class:`StreamPort` (made on first use; see :class:`StreamPort`)."""
        if not self._usable:
            raise self._unusable()
        if self._streams is None:
            self._streams = StreamPort(self, **options)
        return self._streams

    def completions(
        self, min_complete: int = 1, timeout_ns: int = -1
    ) -> list[tuple[int, int, int]]:
        """Like :meth:`enter`, decoded: a list of ``(user_data, res, flags)``."""
        return list(CQE.iter_unpack(self.enter(min_complete, timeout_ns)))

    def _consumed(self, nops: int, done: int) -> None:
        if done >= nops:
            self._nops = 0
            return
        rest = bytes(self._opsbuf[done * RECORD_SIZE : nops * RECORD_SIZE])
        self._opsbuf[: len(rest)] = rest
        self._nops = nops - done

    def _fail(self, err: int, index: int) -> None:
        if err == errno.EINVAL and 0 <= index < self._nops:
            bad = RECORD.unpack_from(self._opsbuf, index * RECORD_SIZE)
            rest = bytes(self._opsbuf[(index + 1) * RECORD_SIZE : self._nops * RECORD_SIZE])
            self._opsbuf[index * RECORD_SIZE : index * RECORD_SIZE + len(rest)] = rest
            self._nops -= 1
            raise ValueError(f"malformed operation record dropped (op, ..., user_data...): {bad}")
        if err == errno.EEXIST:
            raise RuntimeError(
                "this io_uring ring uses IORING_SETUP_SINGLE_ISSUER and belongs to the thread "
                "that first entered it; use it from that thread only (or create the ring "
                "with single_issuer=False)"
            )
        raise OSError(err, os.strerror(err))

    def wake(self) -> None:
        """Make a wait in :meth:`enter` return at once; callable from any thread."""
        if self._forked:
            raise self._unusable()
        with self._wake_lock:
            if self._wake_fd >= 0:
                try:
                    os.eventfd_write(self._wake_fd, 1)
                except BlockingIOError:
                    pass  # the counter is saturated: a wake-up is pending anyway

    # --- provided buffers -------------------------------------------------

    def buffer_group(self, group_id: int, count: int, size: int) -> BufferGroup:
        """Register a ring of ``count`` (a power of two) buffers of ``size`` bytes."""
        if not self._usable:
            raise self._unusable()
        if group_id in self._groups:
            raise ValueError(f"buffer group {group_id} is already registered")
        group = BufferGroup(self, group_id, count, size)
        self._groups[group_id] = group
        return group

    def _flush_groups(self) -> None:
        dirty, self._dirty = self._dirty, []
        for group in dirty:
            group.flush()

    # --- teardown -----------------------------------------------------------

    def close(self) -> None:
        """Cancel everything in flight, wait for the kernel to confirm, free the ring.

        Idempotent.  In a forked child it only releases the child's copies and
        leaves the parent's operations alone.
        """
        r = self._r
        if r is None:
            return
        if self._streams is not None:
            self._streams._ring_closing()
        self._r = None
        self._usable = False
        _live.discard(self)
        lib = self._lib
        with self._wake_lock:
            lib.iomux_ring_close(r, 0 if self._forked else 1)
            for group in self._groups.values():
                group._release(ring_alive=False)
            os.close(self._wake_fd)
            self._wake_fd = -1
        for _, cdata in self._sends.values():
            _ffi.release(cdata)
        self._sends.clear()
        self._groups.clear()
        self._dirty.clear()
        self._retired.clear()
        self._nops = 0

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # nothing useful to do while being collected
            pass


class BufferGroup:
    """A provided-buffer ring: ``count`` buffers of ``size`` bytes the kernel fills.

    Created by :meth:`Ring.buffer_group`.  A receive completion names the
    buffer it used (``flags >> BUFFER_SHIFT``); read it, then hand it back with
    :meth:`release` (batched into the next :meth:`Ring.enter`) or
    :meth:`recycle` (at once).  Give every buffer back exactly once.
    """

    def __init__(self, ring: Ring, group_id: int, count: int, size: int) -> None:
        if count < 1 or count > 32768 or count & (count - 1):
            raise ValueError("count must be a power of two, at most 32768")
        if not 0 <= group_id <= 0xFFFF or size < 1:
            raise ValueError("group_id must be in 0..65535 and size positive")
        self._ring = ring
        self.group_id = group_id
        self.count = count
        self.size = size
        # Python owns the memory: views handed out keep it alive.  Private so
        # that a forked child does not share the parent's receive buffers.
        self._mem = mmap.mmap(-1, count * size, flags=mmap.MAP_PRIVATE)
        self._view = memoryview(self._mem)
        self._cdata = _ffi.from_buffer(self._mem, require_writable=True)
        errp = _ffi.new("int *")
        b = _lib.iomux_bufs_new(ring._r, group_id, count, size, self._cdata, errp)
        if b == _ffi.NULL:
            err = errp[0]
            raise OSError(err, f"registering buffer group {group_id}: {os.strerror(err)}")
        self._b: Any = b
        self._pending = _ffi.new("uint16_t[]", count)
        self._npending = 0

    def view(self, bid: int, length: int) -> memoryview:
        """Zero-copy view of ``length`` bytes of buffer ``bid``, valid until it is given back."""
        if not (0 <= bid < self.count and 0 <= length <= self.size):
            self._bad_range(bid, length)
        start = bid * self.size
        return self._view[start : start + length]

    def take(self, bid: int, length: int) -> bytes:
        """Copy out the first ``length`` bytes of buffer ``bid`` and :meth:`release` it."""
        if not (0 <= bid < self.count and 0 <= length <= self.size):
            self._bad_range(bid, length)
        start = bid * self.size
        data = bytes(self._view[start : start + length])
        self.release(bid)
        return data

    def _bad_range(self, bid: int, length: int) -> None:
        # A slice would silently read a neighbouring buffer (or wrap around).
        raise ValueError(
            f"buffer {bid}, length {length}: the group has buffers 0..{self.count - 1} "
            f"of {self.size} bytes"
        )

    def release(self, bid: int) -> None:
        """Give buffer ``bid`` back at the next :meth:`Ring.enter` (batched, one C call)."""
        if self._b is None:
            raise MultiplexerClosed("this buffer group is closed")
        if not 0 <= bid < self.count:
            raise ValueError(f"buffer id {bid} is not in 0..{self.count - 1}")
        n = self._npending
        if n == self.count:
            raise RuntimeError("more buffers released than the group holds (released twice?)")
        self._pending[n] = bid
        self._npending = n + 1
        if n == 0:
            self._ring._dirty.append(self)

    def flush(self) -> None:
        """Give every buffer passed to :meth:`release` back to the kernel now."""
        n = self._npending
        if n and self._b is not None:
            self._npending = 0
            _lib.iomux_bufs_recycle(self._b, self._pending, n)

    def recycle(self, bids: Iterable[int]) -> None:
        """Give the buffers ``bids`` back to the kernel now, in one call."""
        if self._b is None:
            raise MultiplexerClosed("this buffer group is closed")
        ids = list(bids)
        if any(not 0 <= b < self.count for b in ids):
            raise ValueError(f"buffer ids must be in 0..{self.count - 1}")
        if ids:
            _lib.iomux_bufs_recycle(self._b, _ffi.new("uint16_t[]", ids), len(ids))

    def close(self) -> None:
        """Unregister the group.  Receives still queued on it then fail with -ENOBUFS."""
        ring = self._ring
        if self._b is None:
            return
        if not ring._usable:
            raise ring._unusable()
        self._release(ring_alive=True)
        ring._groups.pop(self.group_id, None)
        # The kernel may still be copying into the memory: keep it until the
        # ring itself is gone.
        ring._retired += [self._mem, self._cdata]

    def _release(self, *, ring_alive: bool) -> None:
        if self._b is not None:
            _lib.iomux_bufs_free(self._ring._r if ring_alive else _ffi.NULL, self._b)
            self._b = None
            self._npending = 0


from iomux import completion as _port  # noqa: E402

_SOP_OPEN = _const("IOMUX_SOP_OPEN", 1)
_SOP_READ = _const("IOMUX_SOP_READ", 2)
_SOP_PAUSE = _const("IOMUX_SOP_PAUSE", 3)
_SOP_SEND = _const("IOMUX_SOP_SEND", 4)
_SOP_SHUT_WR = _const("IOMUX_SOP_SHUT_WR", 5)
_SOP_CLOSE = _const("IOMUX_SOP_CLOSE", 6)
_SOP_NOTIFY = _const("IOMUX_SOP_NOTIFY", 7)
_SOP_LISTEN = _const("IOMUX_SOP_LISTEN", 8)
_SOP_LIMIT = _const("IOMUX_SOP_LIMIT", 9)
_sop_pack = SOP.pack_into
_SOP_SIZE = SOP.size
_send_pair = SEND_PAIR.pack
_PAIR_SIZE = SEND_PAIR.size
#: StreamPort.stage_max: sends this long or longer are records, not staged.
STAGE_MAX = 16 * 1024
_sev_iter = SEV.iter_unpack
AT_FDCWD = -100
_FSYNC_DATASYNC = 1  # IORING_FSYNC_DATASYNC
_CData: Any = _ffi.CData if _ffi is not None else type(None)


def _check_event_kinds() -> None:
    if _lib is None:
        return
    for name in (
        "DATA",
        "EOF",
        "ERROR",
        "SENT",
        "DRAINED",
        "CLOSED",
        "ACCEPTED",
        "ACCEPT_END",
        "BACKLOG",
    ):
        if int(getattr(_lib, "IOMUX_SEV_" + name)) != getattr(_port, name):
            raise ImportError(f"iomux.completion.{name} differs from the C helper's event kind")


_check_event_kinds()


#: StreamPort's provided buffers (count, bytes each) when receives consume
#: them incrementally, and when each receive takes a whole one: 2 MiB either way.
INCREMENTAL_BUFFERS = (32, 64 * 1024)
WHOLE_BUFFERS = (512, 4096)


@functools.cache
def _kernel_has_incremental_buffers() -> bool:
    """Whether this kernel registers a buffer ring with IOU_PBUF_RING_INC (6.12+)."""
    try:
        with Ring(entries=4, cq_entries=8) as ring:
            return ring.stream_port(buffers=2, buffer_size=64, incremental=True).incremental
    except OSError:  # RingSetupError included
        return False  # the caller's own ring will say what is wrong, if anything


class StreamPort(_port.CompletionPort):
    """The ring's :class:`iomux.completion.CompletionPort` (see ``_uring_streams.c``).

    Requests are 16-byte records queued here and handed to the C helper by
    the ring's next :meth:`Ring.enter`, with the bytes of every ``send`` in
    one stage buffer; receives pick ``buffers`` provided buffers of
    ``buffer_size`` bytes, whose bytes the helper copies into a data area of
    ``data_size`` bytes (at most that much is received per enter) and gives
    back at once. ``incremental`` (default: unless IOMUX_URING_DISABLE names
    ``incremental_buffers``) asks the kernel to let receives take only what
    they need of a buffer; by default the buffers are then
    :data:`INCREMENTAL_BUFFERS`, else :data:`WHOLE_BUFFERS`. ``bundles``
    (default: unless IOMUX_URING_DISABLE names ``recv_bundles``) lets one
    receive fill as many buffers as the socket has bytes for, up to 64 KiB
    (kernel 6.10+; with whole buffers only, since an incremental receive
    already takes up to a whole big buffer and bundles measured slower
    there; and only where the data area, by default then as big as all the
    buffers, holds them all). ``guard`` arms
    a poll per connection that restarts a receive that missed the peer's
    end (a kernel race).
    """

    GROUP_ID = 0x1F1

    def __init__(
        self,
        ring: Ring,
        *,
        buffers: int | None = None,
        buffer_size: int | None = None,
        events: int = 4096,
        data_size: int | None = None,
        guard: bool = True,
        incremental: bool | None = None,
        bundles: bool | None = None,
        submitter: Callable[[], None] | None = None,
    ) -> None:
        if incremental is None:
            incremental = "incremental_buffers" not in disabled_features()
        if bundles is None:
            bundles = "recv_bundles" not in disabled_features()
        if buffers is None and buffer_size is None:
            # Big buffers only where receives take part of one (else each
            # small message would use up 64 KiB): measured in bench/README.md.
            incremental = incremental and _kernel_has_incremental_buffers()
            buffers, buffer_size = INCREMENTAL_BUFFERS if incremental else WHOLE_BUFFERS
        else:
            buffers = WHOLE_BUFFERS[0] if buffers is None else buffers
            buffer_size = WHOLE_BUFFERS[1] if buffer_size is None else buffer_size
        if data_size is None:
            # Room for every buffer where bundles may be used (whole buffers).
            whole = bundles and not incremental
            data_size = max(1 << 20, buffers * buffer_size) if whole else 1 << 20
        self._ring = ring
        self._submitter = submitter
        self._ev = _ffi.new("char[]", events * SEV.size)
        self._evview = memoryview(_ffi.buffer(self._ev))
        self._data = _ffi.new("char[]", data_size)
        #: The data area; slicing it gives bytes.
        self.data = _ffi.buffer(self._data)
        err = _ffi.new("int *")
        handle = _lib.iomux_streams_new(
            ring._r,
            buffers,
            buffer_size,
            self.GROUP_ID,
            self._ev,
            events,
            self._data,
            data_size,
            1 if guard else 0,
            1 if incremental else 0,
            1 if bundles else 0,
            err,
        )
        if handle == _ffi.NULL:
            raise OSError(err[0], f"setting up stream connections: {os.strerror(err[0])}")
        #: Whether receives take only what they need of a provided buffer
        #: (IOU_PBUF_RING_INC, kernel 6.12+): asked for and granted.
        self.incremental = bool(_lib.iomux_streams_incremental(ring._r))
        #: Whether one receive fills several provided buffers at once
        #: (IORING_RECVSEND_BUNDLE, kernel 6.10+): asked for and granted.
        self.bundles = bool(_lib.iomux_streams_bundles(ring._r))
        self._counts = _ffi.new("uint64_t[2]")
        self._cap = 256
        self._ops = _ffi.new("char[]", self._cap * SOP.size)
        self._opsview = memoryview(_ffi.buffer(self._ops))
        self._n = 0
        #: The bytes of every send since the last enter, one after the other...
        self.stage = bytearray()
        #: ...and (slot, length) for each, in order, as SEND_PAIR records:
        #: :meth:`send` appends to both, and so may a caller on its fast path
        #: (stage += data, then sends += SEND_PAIR.pack(slot, len(data))).
        self.sends = bytearray()
        #: Sends this long or longer skip the stage: each is a record pointing
        #: at the caller's bytes, which the C helper copies once. (A stage
        #: grown past malloc's mmap threshold and emptied at every enter
        #: would cost an mremap system call per growth step.)
        self.stage_max = STAGE_MAX
        # The buffers of such sends, alive until the C helper took their records.
        self._long_sends: list[Any] = []
        self._nev = 0  # events in the C array (set by Ring.enter)
        self._taken = 0  # of those, handed out by events()
        self._free: list[int] = []
        self._next_slot = 0
        self._sent = _lib.iomux_stream_sent
        self._r: Any = ring._r
        self._final_sent: dict[int, int] = {}
        # File operations in the kernel: request id -> (callback, what to keep alive).
        self._calls: dict[int, tuple[Callable[[int], object], Any]] = {}
        self._done: list[tuple[tuple[Callable[[int], object], Any], int]] = []
        self._next_req = 1
        supported = ring.info()["ops"]
        #: The file operations this kernel's io_uring has (names as IORING_OP_*).
        self.file_ops: frozenset[str] = frozenset(
            name
            for name in ("OPENAT", "READ", "WRITE", "FSYNC", "STATX", "CLOSE", "SPLICE")
            if supported.get(name)  # type: ignore[attr-defined]
        )

    def _push(self, kind: int, slot: int, arg: int, length: int = 0) -> None:
        n = self._n
        if n == self._cap:
            self._grow()
        # Applied after the sends written before it (see _uring_streams.c).
        _sop_pack(
            self._opsview, n * _SOP_SIZE, kind, slot, arg, len(self.sends) // _PAIR_SIZE, length
        )
        self._n = n + 1

    def _grow(self) -> None:
        cap = self._cap * 2
        ops = _ffi.new("char[]", cap * SOP.size)
        _ffi.memmove(ops, self._ops, self._n * SOP.size)
        self._ops, self._opsview, self._cap = ops, memoryview(_ffi.buffer(ops)), cap

    def _consumed(
        self, nsops: int, done: int, nsends: int, sends_done: int, stage_used: int
    ) -> None:
        """The C helper took ``done`` records, ``sends_done`` sends and their bytes."""
        if done >= nsops and sends_done >= nsends:
            self._n = 0
            del self.sends[:]
            self.stage.clear()
            if self._long_sends:
                for cdata in self._long_sends:
                    _ffi.release(cdata)
                self._long_sends.clear()
            return
        # Rare (the event array filled up): keep the rest, in order.
        left = nsops - done
        records = [SOP.unpack_from(self._opsview, (done + i) * _SOP_SIZE) for i in range(left)]
        for i, (kind, slot, arg, before, length) in enumerate(records):
            _sop_pack(self._opsview, i * _SOP_SIZE, kind, slot, arg, before - sends_done, length)
        self._n = left
        del self.sends[: _PAIR_SIZE * sends_done]
        del self.stage[:stage_used]

    def _slot(self) -> int:
        if self._free:
            return self._free.pop()
        slot = self._next_slot
        self._next_slot = slot + 1
        return slot

    # -- CompletionPort -------------------------------------------------------------

    def open(self, fd: int) -> int:
        """Take a connected socket's fd; return its slot."""
        slot = self._slot()
        self._push(_SOP_OPEN, slot, fd)
        return slot

    def listen(self, fd: int) -> int:
        """Accept on a listening socket's fd; return its slot."""
        slot = self._slot()
        self._push(_SOP_LISTEN, slot, fd)
        return slot

    def accept(self, slot: int, fd: int) -> None:
        """Accept again on listener ``slot`` (of ``fd``) after its ACCEPT_END."""
        self._push(_SOP_LISTEN, slot, fd)

    def read(self, slot: int) -> None:
        """Receive on ``slot`` (again)."""
        self._push(_SOP_READ, slot, 0)

    def pause(self, slot: int) -> None:
        """Stop receiving on ``slot``."""
        self._push(_SOP_PAUSE, slot, 0)

    def send(self, slot: int, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` (bytes, or a byte-format buffer) on ``slot``."""
        view = memoryview(data).cast("B")
        if len(view) >= STAGE_MAX:
            # The C helper reads the bytes at the next enter: keep them as they are now.
            cdata = _ffi.from_buffer(data if type(data) is bytes else view.tobytes())
            self._long_sends.append(cdata)
            addr = int(_ffi.cast("uintptr_t", cdata))
            for start in range(0, len(view), 0xFFFFFFFF):
                self._push(_SOP_SEND, slot, addr + start, min(len(view) - start, 0xFFFFFFFF))
            return
        self.stage += view
        self.sends += _send_pair(slot, len(view))

    def shutdown_write(self, slot: int) -> None:
        """Shut down ``slot``'s sending side once everything is sent."""
        self._push(_SOP_SHUT_WR, slot, 0)

    def close(self, slot: int, *, abort: bool = False) -> None:
        """End ``slot`` (see :class:`iomux.completion.CompletionPort`)."""
        self._push(_SOP_CLOSE, slot, 1 if abort else 0)

    def notify_sent(self, slot: int, total: int) -> None:
        """Report SENT once the bytes sent on ``slot`` reach ``total``."""
        self._push(_SOP_NOTIFY, slot, total)

    def limit_backlog(self, slot: int, limit: int) -> None:
        """Report BACKLOG when more than ``limit`` bytes of ``slot`` are not sent yet."""
        self._push(_SOP_LIMIT, slot, limit)

    def sent(self, slot: int) -> int:
        """The total bytes the kernel confirmed sending on ``slot``."""
        if self._r is None:
            return self._final_sent.get(slot, 0)  # the ring is gone: what it had sent
        return int(self._sent(self._r, slot))

    def _ring_closing(self) -> None:
        """The ring is about to be freed: keep what was sent, forget the C memory."""
        free = set(self._free)
        self._final_sent = {
            slot: int(self._sent(self._r, slot))
            for slot in range(self._next_slot)
            if slot not in free
        }
        self._r = None

    def free(self, slot: int) -> None:
        """A CLOSED slot is no longer used by the caller: it may be given out again."""
        self._free.append(slot)

    @property
    def slots_in_use(self) -> int:
        """How many slots :meth:`open` and :meth:`listen` gave out that were not freed."""
        return self._next_slot - len(self._free)

    def receive_counts(self) -> tuple[int, int]:
        """(receive completions that carried bytes, provided buffers they filled) so far.

        Buffers per receive above 1 are bundles at work (see ``bundles``); a
        closed port reports (0, 0).
        """
        if self._r is None:
            return 0, 0
        _lib.iomux_streams_counts(self._r, self._counts)
        return int(self._counts[0]), int(self._counts[1])

    def events(self) -> tuple[Iterable[tuple[int, int, int, int]], Any]:
        """The events since the last call, and the data area (valid until the next poll)."""
        taken, nev = self._taken, self._nev
        self._taken = nev
        if taken == nev:
            return (), self.data
        return _sev_iter(self._evview[taken * 16 : nev * 16]), self.data

    def packed_events(self) -> tuple[memoryview, Any]:
        """The events since the last call as packed records (a view valid until the next poll)."""
        taken, nev = self._taken, self._nev
        self._taken = nev
        return self._evview[taken * 16 : nev * 16], self.data

    # -- file operations ----------------------------------------------------------

    def _file_op(
        self,
        name: str,
        op: int,
        fd: int,
        done: Callable[[int], object],
        keep: Any = None,
        *,
        arg: int = 0,
        arg2: int = 0,
        addr: int = 0,
        addr2: int = 0,
        group: int = 0,
    ) -> None:
        if name not in self.file_ops:
            raise io.UnsupportedOperation(f"this kernel's io_uring has no {name} operation")
        req = self._next_req
        self._next_req = req % 0xFFFFFFFF + 1
        self._calls[req] = (done, keep)
        try:
            self._ring._push(op, 0, group, fd, arg, arg2, COMPLETION_TAG | req, addr, addr2)
        except BaseException:
            del self._calls[req]
            raise

    def _op_done(self, user_data: int, res: int) -> None:
        call = self._calls.pop(user_data & 0xFFFFFFFF, None)
        if call is not None:
            self._done.append((call, res))

    def run_done(self) -> None:
        """Call the callbacks of the file operations that completed, in order."""
        done, self._done = self._done, []
        for (callback, keep), res in done:
            if keep is not None:
                for item in keep:
                    if isinstance(item, _CData):
                        _ffi.release(item)
            callback(res)

    def _buffer(self, buffer: Any, *, writable: bool) -> tuple[Any, int, int]:
        cdata = _ffi.from_buffer(buffer, require_writable=writable)
        return cdata, int(_ffi.cast("uintptr_t", cdata)), len(cdata)

    def open_file(
        self,
        path: bytes,
        flags: int,
        mode: int,
        done: Callable[[int], object],
        *,
        dir_fd: int = AT_FDCWD,
    ) -> None:
        """Open ``path`` (bytes); ``done(fd or -errno)``."""
        cpath = _ffi.new("char[]", path)
        self._file_op(
            "OPENAT",
            OP_OPENAT,
            dir_fd,
            done,
            (cpath,),
            arg=flags,
            arg2=mode,
            addr=int(_ffi.cast("uintptr_t", cpath)),
        )

    def read_file(self, fd: int, buffer: Any, offset: int, done: Callable[[int], object]) -> None:
        """Read into ``buffer`` from ``offset`` (-1: the file position); ``done(n or -errno)``."""
        cdata, addr, length = self._buffer(buffer, writable=True)
        self._file_op(
            "READ",
            OP_READ,
            fd,
            done,
            (buffer, cdata),
            arg2=min(length, 1 << 30),
            addr=addr,
            addr2=offset & 0xFFFFFFFFFFFFFFFF,
        )

    def write_file(self, fd: int, data: Any, offset: int, done: Callable[[int], object]) -> None:
        """Write ``data`` at ``offset`` (-1: the file position); ``done(n or -errno)``."""
        cdata, addr, length = self._buffer(data, writable=False)
        self._file_op(
            "WRITE",
            OP_WRITE,
            fd,
            done,
            (data, cdata),
            arg2=min(length, 1 << 30),
            addr=addr,
            addr2=offset & 0xFFFFFFFFFFFFFFFF,
        )

    def fsync_file(self, fd: int, done: Callable[[int], object], *, datasync: bool = False) -> None:
        """Flush ``fd`` to storage; ``done(0 or -errno)``."""
        self._file_op("FSYNC", OP_FSYNC, fd, done, arg=_FSYNC_DATASYNC if datasync else 0)

    def statx_file(
        self,
        path: bytes,
        flags: int,
        mask: int,
        buffer: Any,
        done: Callable[[int], object],
        *,
        dir_fd: int = AT_FDCWD,
    ) -> None:
        """``statx(2)`` of ``path`` into ``buffer`` (256 bytes); ``done(0 or -errno)``."""
        cpath = _ffi.new("char[]", path)
        cdata, addr, length = self._buffer(buffer, writable=True)
        if length < 256:
            _ffi.release(cdata)
            raise ValueError("a statx buffer needs 256 bytes")
        self._file_op(
            "STATX",
            OP_STATX,
            dir_fd,
            done,
            (cpath, buffer, cdata),
            arg=flags,
            arg2=mask,
            addr=int(_ffi.cast("uintptr_t", cpath)),
            addr2=addr,
        )

    def close_file(self, fd: int, done: Callable[[int], object]) -> None:
        """Close ``fd`` in the kernel; ``done(0 or -errno)``."""
        self._file_op("CLOSE", OP_CLOSE, fd, done)

    def splice(
        self,
        fd_in: int,
        off_in: int,
        fd_out: int,
        off_out: int,
        length: int,
        done: Callable[[int], object],
        *,
        flags: int = 0,
    ) -> None:
        """Move ``length`` bytes from ``fd_in`` to ``fd_out`` (one must be a pipe;
        offset -1: none); ``done(n or -errno)``."""
        self._file_op(
            "SPLICE",
            OP_SPLICE,
            fd_in,
            done,
            arg=fd_out,
            arg2=min(length, 1 << 30),
            addr=off_in & 0xFFFFFFFFFFFFFFFF,
            addr2=off_out & 0xFFFFFFFFFFFFFFFF,
            group=flags & 0xFFFF,
        )

    @property
    def used(self) -> bool:
        """Whether a slot was ever given out."""
        return self._next_slot > 0

    @property
    def queued(self) -> bool:
        """Whether records or sends wait for the next enter."""
        return bool(self._n or self.sends)

    @property
    def pending(self) -> bool:
        """Whether events (or file operations' results) are waiting to be handled."""
        return self._taken != self._nev or bool(self._done)

    def submit(self) -> None:
        """Hand queued records to the kernel now (through the driver that owns the ring)."""
        if (self._n or self.sends) and self._submitter is not None:
            self._submitter()
