"""The loop's event dispatch: the C dispatchers (``iomux.reactor._speedups``) on their
own, then the loop over real sockets, completion and readiness, with them and with the
Python dispatch (``IOMUX_SPEEDUPS=0``), which must behave the same."""

from __future__ import annotations

import asyncio
import contextvars
import socket
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest

from iomux.completion import DATA, EOF, EVENT_RECORD, SEND_PAIR, SENT
from iomux.reactor import Reactor
from iomux.reactor import speedups as speedups_module

TIMEOUT = 10.0


def test_the_c_dispatcher_is_built_here() -> None:
    # The package builds it wherever a C compiler is (as for the io_uring
    # driver): without it the loop is slower, so its absence is a failure.
    try:
        from iomux.reactor import _speedups
    except ImportError as exc:  # pragma: no cover - the failure this test exists for
        pytest.fail(f"iomux.reactor._speedups was not built ({exc}); reinstall with a C compiler")
    assert _speedups.RECORD_SIZE == EVENT_RECORD.size


def test_an_extension_built_with_other_record_layouts_is_refused() -> None:
    built = pytest.importorskip("iomux.reactor._speedups")  # its absence fails above
    speedups_module.check_layouts(built)  # what happened at import
    other = types.SimpleNamespace(RECORD_SIZE=EVENT_RECORD.size, SEND_PAIR_SIZE=12)
    with pytest.raises(ImportError, match=r"'SEND_PAIR_SIZE': \(12, 8\).*rebuild it"):
        speedups_module.check_layouts(other)


def test_iomux_speedups_0_turns_the_c_dispatch_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOMUX_SPEEDUPS", "0")
    assert speedups_module.speedups() is None
    monkeypatch.setenv("IOMUX_SPEEDUPS", "1")
    assert speedups_module.speedups() is not None


# --- the dispatcher on its own --------------------------------------------------------

try:
    from iomux.reactor._speedups import (
        Dispatcher,
        ReadyDispatcher,
        StageWriteMethod,
        WriteMethod,
    )
except ImportError:  # reported by test_the_c_dispatcher_is_built_here
    Dispatcher = ReadyDispatcher = WriteMethod = StageWriteMethod = None  # type: ignore[assignment,misc]

needs_dispatcher = pytest.mark.skipif(Dispatcher is None, reason="the C dispatcher is not built")
current = contextvars.ContextVar("current", default="none")


class Owner:
    """The attributes the dispatcher reads, as __slots__ (as a transport has them)."""

    __slots__ = ("_buffered", "_context", "_data_received", "_deadlines", "_protocol", "_reading")

    def __init__(self, protocol: Any, name: str) -> None:
        self._reading = True
        self._deadlines: object = None
        self._buffered = False
        self._context = contextvars.copy_context()
        self._context.run(current.set, name)
        self._protocol = protocol
        self._data_received = type(protocol).data_received


class SubOwner(Owner):
    __slots__ = ()


class Log:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def handle(self, slot: int, kind: int, res: int, off: int) -> None:
        self.calls.append(("handle", slot, kind, res, off))

    def failed(self, owner: Any, exc: BaseException) -> None:
        self.calls.append(("failed", owner, exc))


class Proto:
    def __init__(self, log: Log, name: str) -> None:
        self.log = log
        self.name = name

    def data_received(self, data: bytes) -> None:
        self.log.calls.append(("data", self.name, data, current.get()))


def records(*events: tuple[int, int, int, int]) -> bytes:
    return b"".join(EVENT_RECORD.pack(*e) for e in events)


@needs_dispatcher
def test_dispatcher_keeps_the_order_and_hands_on_what_it_does_not_deliver() -> None:
    log = Log()
    a = Owner(Proto(log, "a"), "ctx-a")
    b = Owner(Proto(log, "b"), "ctx-b")
    paused = Owner(Proto(log, "paused"), "ctx-p")
    paused._reading = False
    timed = Owner(Proto(log, "timed"), "ctx-t")
    timed._deadlines = object()
    sub = SubOwner(Proto(log, "sub"), "ctx-s")
    slots: list[Any] = [a, None, b, paused, timed, sub]
    dispatch = Dispatcher(Owner, slots, log.handle, log.failed)
    data = b"hello" + b"world" + b"xyz"
    dispatch(
        records(
            (0, DATA, 5, 0),
            (1, DATA, 3, 10),  # no owner
            (2, DATA, 5, 5),
            (0, SENT, 7, 0),  # not DATA
            (3, DATA, 3, 10),  # not reading
            (4, DATA, 3, 10),  # has deadlines
            (5, DATA, 3, 10),  # a subclass
            (9, DATA, 1, 0),  # past the slot list
            (2, EOF, 0, 0),
            (0, DATA, 3, 10),
        ),
        memoryview(data),
    )
    assert log.calls == [
        ("data", "a", b"hello", "ctx-a"),
        ("handle", 1, DATA, 3, 10),
        ("data", "b", b"world", "ctx-b"),
        ("handle", 0, SENT, 7, 0),
        ("handle", 3, DATA, 3, 10),
        ("handle", 4, DATA, 3, 10),
        ("handle", 5, DATA, 3, 10),
        ("handle", 9, DATA, 1, 0),
        ("handle", 2, EOF, 0, 0),
        ("data", "a", b"xyz", "ctx-a"),
    ]
    assert current.get() == "none"  # each context was left again


@needs_dispatcher
def test_dispatcher_reports_a_failing_data_received_and_goes_on() -> None:
    log = Log()

    class Failing(Proto):
        def data_received(self, data: bytes) -> None:
            raise ValueError(f"bad {data!r}")

    bad = Owner(Failing(log, "bad"), "ctx")
    good = Owner(Proto(log, "good"), "ctx")
    Dispatcher(Owner, [bad, good], log.handle, log.failed)(
        records((0, DATA, 2, 0), (1, DATA, 2, 2)), b"abcd"
    )
    assert [c[0] for c in log.calls] == ["failed", "data"]
    _, owner, exc = log.calls[0]
    assert owner is bad
    assert isinstance(exc, ValueError) and str(exc) == "bad b'ab'"
    assert exc.__traceback__ is not None  # for the error report
    assert log.calls[1] == ("data", "good", b"cd", "ctx")


@needs_dispatcher
@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_dispatcher_lets_keyboard_interrupt_and_system_exit_through(
    exc_type: type[BaseException],
) -> None:
    log = Log()

    class Interrupting(Proto):
        def data_received(self, data: bytes) -> None:
            raise exc_type

    owner = Owner(Interrupting(log, "i"), "ctx")
    with pytest.raises(exc_type):
        Dispatcher(Owner, [owner], log.handle, log.failed)(
            records((0, DATA, 1, 0), (0, EOF, 0, 0)), b"x"
        )
    assert log.calls == []  # stopped there, as a raising callback stops the loop
    assert current.get() == "none"


@needs_dispatcher
def test_dispatcher_survives_data_received_dropping_its_transport() -> None:
    log = Log()
    slots: list[Any] = []

    class Dropping(Proto):
        def data_received(self, data: bytes) -> None:
            slots[0] = None  # the last reference to the owner, its context, this protocol
            super().data_received(data)

    slots.append(Owner(Dropping(log, "d"), "ctx"))
    Dispatcher(Owner, slots, log.handle, log.failed)(
        records((0, DATA, 1, 0), (0, DATA, 1, 1)), b"xy"
    )
    assert log.calls == [("data", "d", b"x", "ctx"), ("handle", 0, DATA, 1, 1)]


@needs_dispatcher
def test_dispatcher_refuses_bad_arguments_with_what_was_wrong() -> None:
    class NoSlots:
        pass

    with pytest.raises(AttributeError, match="_reading"):
        Dispatcher(NoSlots, [], print, print)

    class PropertyReading(Owner):
        __slots__ = ()
        _reading = property(lambda self: True)  # type: ignore[assignment]

    with pytest.raises(TypeError, match=r"PropertyReading\._reading is not a __slots__"):
        Dispatcher(PropertyReading, [], print, print)
    with pytest.raises(TypeError, match="callable"):
        Dispatcher(Owner, [], None, print)
    dispatch = Dispatcher(Owner, [], print, print)
    with pytest.raises(ValueError, match="multiple of 16 bytes, not 15"):
        dispatch(b"x" * 15, b"")
    with pytest.raises(TypeError, match=r"Dispatcher\(records, data\): wrong arguments"):
        dispatch(b"")  # type: ignore[call-arg]


@needs_dispatcher
def test_dispatcher_hands_on_data_outside_the_data_area() -> None:
    log = Log()
    owner = Owner(Proto(log, "a"), "ctx")
    Dispatcher(Owner, [owner], log.handle, log.failed)(records((0, DATA, 4, 2)), b"abc")
    assert log.calls == [("handle", 0, DATA, 4, 2)]  # the Python handler decides


class ReadyOwner:
    """The attributes the readiness dispatcher reads, as a readiness transport has them."""

    __slots__ = (
        "_buffered",
        "_closing",
        "_context",
        "_deadlines",
        "_edge",
        "_paused",
        "_protocol",
        "_read_eof",
        "_sock_fd",
    )

    def __init__(self, protocol: Any, sock: socket.socket, name: str) -> None:
        self._closing = self._paused = self._read_eof = self._edge = self._buffered = False
        self._deadlines: object = None
        self._sock_fd = sock.fileno()
        self._context = contextvars.copy_context()
        self._context.run(current.set, name)
        self._protocol = protocol


class ReadyLog(Log):
    def handle_ready(self, target: Any, mask: int) -> None:
        self.calls.append(("handle", target, mask))

    def read_failed(self, owner: Any, exc: BaseException) -> None:
        self.calls.append(("read_failed", owner, exc))


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made: list[tuple[socket.socket, socket.socket]] = []
    yield made
    for a, b in made:
        a.close()
        b.close()


def pair(made: list[tuple[socket.socket, socket.socket]]) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    made.append((a, b))
    return a, b


@needs_dispatcher
def test_ready_dispatcher_reads_plain_transports_and_hands_on_the_rest(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    log = ReadyLog()
    (a, a_peer), (b, b_peer), (c, c_peer), (d, _), (e, e_peer) = (pair(pairs) for _ in range(5))
    plain = ReadyOwner(Proto(log, "plain"), a, "ctx-a")
    paused = ReadyOwner(Proto(log, "paused"), b, "ctx-b")
    paused._paused = True
    ended = ReadyOwner(Proto(log, "ended"), c, "ctx-c")
    stale = ReadyOwner(Proto(log, "stale"), d, "ctx-d")

    class Sub(ReadyOwner):
        __slots__ = ()

    sub = Sub(Proto(log, "sub"), e, "ctx-e")
    a_peer.sendall(b"one")
    b_peer.sendall(b"two")
    c_peer.close()  # end of stream: the Python handler's own read sees it
    e_peer.sendall(b"five")
    dispatch = ReadyDispatcher(ReadyOwner, log.handle_ready, log.read_failed, log.failed, 1024)
    dispatch(
        [
            (a.fileno(), 1, plain),
            (b.fileno(), 1, paused),
            (c.fileno(), 1, ended),
            (d.fileno(), 1, stale),  # nothing to read: readiness can be stale
            (a.fileno(), 2, plain),
            (a.fileno(), 3, plain),
            (e.fileno(), 1, sub),
            (7, 1, "a watch"),
        ]
    )
    assert log.calls == [
        ("data", "plain", b"one", "ctx-a"),
        ("handle", paused, 1),
        ("handle", ended, 1),
        ("handle", plain, 2),
        ("handle", plain, 3),
        ("handle", sub, 1),
        ("handle", "a watch", 1),
    ]
    assert b.recv(10) == b"two" and c.recv(10) == b"" and e.recv(10) == b"five"


@needs_dispatcher
def test_ready_dispatcher_reads_at_most_read_size_per_event(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    log = ReadyLog()
    a, peer = pair(pairs)
    owner = ReadyOwner(Proto(log, "a"), a, "ctx")
    peer.sendall(b"x" * 100)
    ReadyDispatcher(ReadyOwner, log.handle_ready, log.read_failed, log.failed, 64)(
        [(a.fileno(), 1, owner)]
    )
    assert log.calls == [("data", "a", b"x" * 64, "ctx")]
    assert a.recv(100) == b"x" * 36


@needs_dispatcher
def test_ready_dispatcher_reports_read_errors_and_failing_protocols(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    import struct

    log = ReadyLog()
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    server.setblocking(False)
    pairs.append((client, server))
    reset = ReadyOwner(Proto(log, "reset"), server, "ctx")
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # a reset
    time.sleep(0.05)

    class Failing(Proto):
        def data_received(self, data: bytes) -> None:
            raise ValueError("bad")

    a, peer = pair(pairs)
    failing = ReadyOwner(Failing(log, "f"), a, "ctx")
    peer.sendall(b"x")
    ReadyDispatcher(ReadyOwner, log.handle_ready, log.read_failed, log.failed, 1024)(
        [(server.fileno(), 1, reset), (a.fileno(), 1, failing)]
    )
    assert [(c[0], c[1]) for c in log.calls] == [("read_failed", reset), ("failed", failing)]
    assert isinstance(log.calls[0][2], ConnectionResetError)
    assert isinstance(log.calls[1][2], ValueError)


@needs_dispatcher
def test_ready_dispatcher_lets_keyboard_interrupt_through(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    log = ReadyLog()

    class Interrupting(Proto):
        def data_received(self, data: bytes) -> None:
            raise KeyboardInterrupt

    a, peer = pair(pairs)
    owner = ReadyOwner(Interrupting(log, "i"), a, "ctx")
    peer.sendall(b"x")
    with pytest.raises(KeyboardInterrupt):
        ReadyDispatcher(ReadyOwner, log.handle_ready, log.read_failed, log.failed, 1024)(
            [(a.fileno(), 1, owner), (a.fileno(), 2, owner)]
        )
    assert log.calls == []
    assert current.get() == "none"


@needs_dispatcher
def test_ready_dispatcher_refuses_bad_arguments_with_what_was_wrong() -> None:
    with pytest.raises(ValueError, match="read_size must be positive, not 0"):
        ReadyDispatcher(ReadyOwner, print, print, print, 0)
    with pytest.raises(TypeError, match="None is not callable"):
        ReadyDispatcher(ReadyOwner, print, None, print, 10)
    with pytest.raises(AttributeError, match="_closing"):
        ReadyDispatcher(Owner, print, print, print, 10)
    dispatch = ReadyDispatcher(ReadyOwner, print, print, print, 10)
    with pytest.raises(TypeError, match=r"\(fd, mask, target\) tuple, not \(1, 2\)"):
        dispatch([(1, 2)])
    with pytest.raises(TypeError, match="must be a sequence"):
        dispatch(5)


class Writer:
    """The attributes the write method reads, as a readiness transport has them."""

    __slots__ = ("_buffer", "_conn_lost", "_deadlines", "_empty_waiter", "_eof", "_sock_fd")

    def __init__(self, sock: socket.socket) -> None:
        self._buffer: bytes | bytearray = b""
        self._conn_lost = 0
        self._eof = False
        self._empty_waiter: object = None
        self._deadlines: object = None
        self._sock_fd = sock.fileno()


class WriteLog(Log):
    def slow(self, transport: Any, data: Any) -> None:
        self.calls.append(("slow", transport, bytes(data)))

    def rest(self, transport: Any, data: bytes, sent: int) -> None:
        self.calls.append(("rest", transport, len(data), sent))
        transport._buffer = bytearray(data[sent:])


def writing(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> tuple[WriteLog, socket.socket, socket.socket, Writer, Any]:
    """A log, a socket pair, a Writer over the first socket, and a WriteMethod for Writer."""
    log = WriteLog()
    sock, peer = pair(pairs)
    return log, sock, peer, Writer(sock), WriteMethod(Writer, log.slow, log.rest, log.failed)


@needs_dispatcher
def test_write_method_sends_at_once_and_hands_on_the_rest(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    log, a, peer, writer, write = writing(pairs)
    write(writer, b"hello")  # nothing buffered: straight to the socket
    assert peer.recv(10) == b"hello" and log.calls == []
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = b"x" * (1 << 20)
    write(writer, big)  # more than the socket takes
    assert log.calls[0][:3] == ("rest", writer, len(big)) and 0 < log.calls[0][3] < len(big)
    write(writer, b"more")  # something is buffered now: Python's write
    write(writer, bytearray(b"ba"))  # not bytes
    write(writer, b"")
    assert log.calls[1:] == [
        ("slow", writer, b"more"),
        ("slow", writer, b"ba"),
        ("slow", writer, b""),
    ]


@needs_dispatcher
def test_write_method_hands_a_full_socket_and_a_dead_peer_to_python(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    log, a, _, writer, write = writing(pairs)
    try:
        while True:
            a.send(b"y" * 65536)
    except BlockingIOError:
        pass
    write(writer, b"z" * 10)  # the socket takes nothing
    assert log.calls == [("rest", writer, 10, 0)]
    b, b_peer = pair(pairs)
    b_peer.close()
    dead = Writer(b)
    write(dead, b"q")
    assert [c[:2] for c in log.calls[1:]] == [("failed", dead)]
    assert isinstance(log.calls[1][2], (BrokenPipeError, ConnectionResetError))


@needs_dispatcher
def test_write_method_is_a_method_and_leaves_other_states_to_python(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    log, a, peer, _, _ = writing(pairs)

    class Transport(Writer):
        __slots__ = ()
        write: Any = None

    method = WriteMethod(Transport, log.slow, log.rest, log.failed)
    Transport.write = method
    assert Transport.write is method
    t = Transport(a)
    t.write(b"one")  # bound, called the usual way
    bound = t.write
    bound(b"two")
    assert peer.recv(10) == b"onetwo" and log.calls == []
    for attr, value in [
        ("_eof", True),
        ("_conn_lost", 1),
        ("_empty_waiter", object()),
        ("_deadlines", object()),
    ]:
        state = Transport(a)
        setattr(state, attr, value)
        state.write(b"s")
        assert log.calls[-1] == ("slow", state, b"s"), attr

    class Sub(Transport):
        __slots__ = ()

    sub = Sub(a)
    sub.write(b"u")
    assert log.calls[-1] == ("slow", sub, b"u")
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(10)  # none of those reached the socket: Python's write (logged) had them
    with pytest.raises(TypeError, match=r"write\(transport, data\): wrong arguments"):
        method(t)


class Stager:
    """The attributes the stage write method reads, as a completion transport has them."""

    __slots__ = (
        "_acked",
        "_blocked",
        "_deadlines",
        "_pause_above",
        "_protocol_paused",
        "_sends",
        "_slot",
        "_stage",
        "_stage_max",
        "_written",
    )

    def __init__(self, stage: bytearray, sends: bytearray, slot: int) -> None:
        self._stage, self._sends, self._slot = stage, sends, slot
        self._blocked = False
        self._deadlines: object = None
        self._stage_max = 16
        self._written = self._acked = 0
        self._pause_above = 1000
        self._protocol_paused = False


class StageLog(Log):
    def slow(self, transport: Any, data: Any) -> None:
        self.calls.append(("slow", transport, bytes(data)))

    def check_pause(self, transport: Any) -> None:
        self.calls.append(("check_pause", transport, transport._written))


def staging() -> tuple[StageLog, bytearray, bytearray, Any]:
    """A log, a stage, its send pairs and a StageWriteMethod for Stager."""
    log = StageLog()
    return log, bytearray(), bytearray(), StageWriteMethod(Stager, log.slow, log.check_pause)


def pairs_of(sends: bytearray) -> list[tuple[int, int]]:
    return [SEND_PAIR.unpack_from(sends, i) for i in range(0, len(sends), SEND_PAIR.size)]


@needs_dispatcher
def test_stage_write_appends_the_bytes_and_their_pair_in_order() -> None:
    from iomux.reactor import _speedups

    assert _speedups.SEND_PAIR_SIZE == SEND_PAIR.size
    log, stage, sends, write = staging()
    a, b = Stager(stage, sends, 3), Stager(stage, sends, 70000)
    for t, data in [(a, b"hello"), (b, b"x" * 15), (a, b"!")]:
        write(t, data)
    assert stage == b"hello" + b"x" * 15 + b"!" and log.calls == []
    assert pairs_of(sends) == [(3, 5), (70000, 15), (3, 1)]
    assert (a._written, b._written) == (6, 15)
    for _ in range(2000):  # the arrays grow without losing what they hold
        write(b, b"ab")
    assert len(stage) == 21 + 4000 and stage.endswith(b"ab" * 2000)
    assert pairs_of(sends)[3:] == [(70000, 2)] * 2000 and b._written == 4015
    del stage[:], sends[:]  # as the port consumes them
    write(a, b"again")
    assert stage == b"again" and pairs_of(sends) == [(3, 5)]


@needs_dispatcher
def test_stage_write_hands_every_other_case_to_python() -> None:
    log, stage, sends, write = staging()
    t = Stager(stage, sends, 1)
    for data in [b"", b"y" * 16, bytearray(b"ba"), memoryview(b"mv")]:
        write(t, data)  # empty, not shorter than _stage_max, not bytes
    states: list[tuple[str, Any]] = [
        ("_blocked", True),
        ("_deadlines", object()),
        ("_slot", -1),
        ("_slot", 1 << 32),
        ("_written", 1 << 70),
        ("_stage_max", "16"),
        ("_stage", b"bytes, not a bytearray"),
    ]
    for attr, value in states:
        state = Stager(stage, sends, 1)
        setattr(state, attr, value)
        write(state, b"s")
        assert log.calls[-1] == ("slow", state, b"s"), attr

    class Sub(Stager):
        __slots__ = ()

    sub = Sub(stage, sends, 1)
    write(sub, b"u")
    unset = Stager.__new__(Stager)  # no attributes at all
    write(unset, b"n")
    assert [c[2] for c in log.calls] == [b"", b"y" * 16, b"ba", b"mv"] + [b"s"] * 7 + [b"u", b"n"]
    assert log.calls[-2:] == [("slow", sub, b"u"), ("slow", unset, b"n")]
    assert stage == b"" and sends == b"" and t._written == 0  # nothing was staged


@needs_dispatcher
def test_stage_write_checks_pause_above_the_mark_unless_paused() -> None:
    log, stage, sends, write = staging()
    t = Stager(stage, sends, 2)
    t._pause_above, t._acked = 20, 5
    write(t, b"a" * 15)  # 15 - 5 unacknowledged: below
    write(t, b"b" * 10)  # 25 - 5 = 20: not above
    assert log.calls == []
    write(t, b"c")
    assert log.calls == [("check_pause", t, 26)]  # _written is set before the check
    t._protocol_paused = True
    write(t, b"d")
    assert log.calls == [("check_pause", t, 26)] and t._written == 27

    def failing(transport: Any) -> None:
        raise RuntimeError("from check_pause")

    t._protocol_paused = False
    with pytest.raises(RuntimeError, match="from check_pause"):
        StageWriteMethod(Stager, log.slow, failing)(t, b"e")
    assert stage.endswith(b"de") and t._written == 28  # staged before the check failed


@needs_dispatcher
def test_stage_write_refuses_an_exported_stage_and_queues_nothing() -> None:
    log, stage, sends, write = staging()
    t = Stager(stage, sends, 4)
    write(t, b"one")
    with memoryview(stage):
        with pytest.raises(BufferError):
            write(t, b"two")
    assert stage == b"one" and pairs_of(sends) == [(4, 3)] and t._written == 3
    view = memoryview(sends)
    with pytest.raises(BufferError):
        write(t, b"three")
    view.release()
    assert stage == b"one" and pairs_of(sends) == [(4, 3)] and t._written == 3
    write(t, b"four")
    assert stage == b"onefour" and pairs_of(sends) == [(4, 3), (4, 4)] and log.calls == []


@needs_dispatcher
def test_stage_write_is_a_method_of_its_class() -> None:
    log, stage, sends, _ = staging()

    class Transport(Stager):
        __slots__ = ()
        write: Any = None

    method = StageWriteMethod(Transport, log.slow, log.check_pause)
    Transport.write = method
    assert Transport.write is method
    t = Transport(stage, sends, 9)
    t.write(b"one")
    bound = t.write
    bound(b"two")
    assert stage == b"onetwo" and pairs_of(sends) == [(9, 3), (9, 3)]
    with pytest.raises(TypeError, match=r"write\(transport, data\): wrong arguments"):
        method(t)

    class Missing:
        __slots__ = ("_blocked",)

    with pytest.raises(AttributeError, match="_deadlines"):
        StageWriteMethod(Missing, log.slow, log.check_pause)
    with pytest.raises(TypeError, match="callable"):
        StageWriteMethod(Stager, log.slow, None)


def test_the_completion_transport_writes_with_the_c_method_where_built() -> None:
    from iomux.reactor.completion import CompletionStreamTransport

    method = CompletionStreamTransport.__dict__["write"]
    built = speedups_module.speedups() is not None
    assert (StageWriteMethod is not None and type(method) is StageWriteMethod) is built


# --- the loop, with either dispatch -------------------------------------------------------


@pytest.fixture(
    params=[
        ("io_uring", "completion", "c"),
        ("io_uring", "completion", "python"),
        ("epoll", "readiness", "c"),
        ("epoll", "readiness", "python"),
        ("poll", "readiness", "c"),
    ],
    ids="-".join,
)
def reactor(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Reactor]:
    backend, io, dispatch = request.param
    if dispatch == "c" and Dispatcher is None:
        pytest.fail("the C dispatcher is not built (see test_the_c_dispatcher_is_built_here)")
    monkeypatch.setenv(speedups_module.SPEEDUPS_ENV, "1" if dispatch == "c" else "0")
    loop = Reactor(backend, io=io)
    try:
        yield loop
    finally:
        if not loop.is_closed():
            loop.run_until_complete(loop.shutdown(grace=0, drain=0))
            loop.close()


def run(loop: Reactor, coro: Any) -> Any:
    return loop.run_until_complete(asyncio.wait_for(coro, TIMEOUT))


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


class Echo(asyncio.Protocol):
    """Echoes; raises on b"boom"; switches to Upper on b"switch"."""

    made: list[Echo] = []

    def __init__(self, loop: Reactor) -> None:
        self.loop = loop
        self.lost: asyncio.Future[BaseException | None] = loop.create_future()
        self.context_value = ""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        Echo.made.append(self)

    def data_received(self, data: bytes) -> None:
        if data == b"boom":
            raise RuntimeError("boom")
        if data == b"switch":
            self.transport.set_protocol(Upper(self))
            self.transport.write(b"switched")
            return
        self.transport.write(current.get().encode() + b":" + data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class Upper(asyncio.Protocol):
    def __init__(self, first: Echo) -> None:
        self.first = first
        self.transport = first.transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())

    def connection_lost(self, exc: BaseException | None) -> None:
        self.first.connection_lost(exc)


def test_loop_dispatch_contexts_errors_and_protocol_switches(reactor: Reactor) -> None:
    Echo.made = []
    errors: list[dict[str, Any]] = []
    reactor.set_exception_handler(lambda loop, ctx: errors.append(ctx))
    token = current.set("server")  # the context the server, and its connections, start from
    try:
        server = run(reactor, reactor.create_server(lambda: Echo(reactor), "127.0.0.1", 0))
    finally:
        current.reset(token)
    port = server.sockets[0].getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        for c in clients:
            c.settimeout(TIMEOUT)

        async def until(cond: Any) -> None:
            while not cond():
                await asyncio.sleep(0.005)

        run(reactor, until(lambda: len(Echo.made) == 3))

        async def exchange(sock: socket.socket, data: bytes, n: int) -> bytes:
            sock.sendall(data)
            return await reactor.run_in_executor(None, recv_exactly, sock, n)

        def client_of(protocol: Echo) -> socket.socket:
            peer = protocol.transport.get_extra_info("peername")
            return next(s for s in clients if s.getsockname() == peer)

        first, second, third = (client_of(p) for p in Echo.made)
        # data_received runs in the context the connection was made in.
        for sock in (first, second, third):
            assert run(reactor, exchange(sock, b"hi", 9)) == b"server:hi"
        assert run(reactor, exchange(second, b"switch", 8)) == b"switched"
        assert run(reactor, exchange(second, b"abc", 3)) == b"ABC"  # the new protocol's
        first.sendall(b"boom")
        exc = run(reactor, Echo.made[0].lost)
        assert isinstance(exc, RuntimeError) and str(exc) == "boom"
        assert first.recv(1) == b""  # the transport was closed
        assert [e["message"] for e in errors] == [
            "Fatal error: protocol.data_received() call failed."
        ]
        assert errors[0]["exception"] is exc
        # The others go on.
        assert run(reactor, exchange(second, b"def", 3)) == b"DEF"
        assert run(reactor, exchange(third, b"ok", 9)) == b"server:ok"
    finally:
        for c in clients:
            c.close()
        server.close()


def test_loop_keyboard_interrupt_in_data_received_stops_the_loop(reactor: Reactor) -> None:
    class Interrupt(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            raise KeyboardInterrupt

    server = run(reactor, reactor.create_server(Interrupt, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(b"x")
        deadline = time.monotonic() + TIMEOUT
        with pytest.raises(KeyboardInterrupt):
            while time.monotonic() < deadline:
                reactor.run_once(0.05)
    server.close()
