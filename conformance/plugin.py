"""The pytest plugin that runs the conformance suite against drivers.

It is installed as a ``pytest11`` entry point, so any pytest run in an
environment with iomux has its options:

``--iomux-driver module:Class``
    Run the suite on this driver class (repeatable). A third party tests
    its own driver with ``pytest --pyargs iomux.conformance --iomux-driver
    mypkg.mymod:MyDriver`` or ``python -m iomux conformance --driver ...``.
``--iomux-backend NAME``
    Run the suite on this registered backend (repeatable). With neither
    option, every built-in backend is tested.

Every test that takes the ``driver`` fixture runs once per driver. A
built-in driver that cannot run on Linux makes its tests *fail* with the
reason: a skip would hide a broken install. A capability a driver declares
it lacks is a skip that names the capability (see :func:`require`).

Event-loop tests also take the ``reactor_io`` fixture: they run once with
readiness I/O (``Reactor(io="readiness")``) and once with completion I/O
(``io="completion"``), which is a skip on drivers that do not declare
``capabilities.completion``; so every driver has the same number of cases.

The asyncio-compatibility section (``test_asyncio_*.py``) takes the
``loop_kind`` and ``aio_loop`` fixtures: each of its tests runs once on stock
asyncio (the reference, id ``asyncio``, once per session whatever the drivers)
and once on iomux's event loop over every driver under test, so that any
difference from asyncio is a failing test. ``aio_loop`` is a fresh loop,
closed afterwards; the test fails if it leaves fds, threads or child
processes behind.
"""

from __future__ import annotations

import asyncio
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest

from iomux.multiplexer import Multiplexer, Trigger
from iomux.registry import AUTO_ORDER, backend_info, load_driver


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the ``--iomux-driver`` and ``--iomux-backend`` options."""
    group = parser.getgroup("iomux", "iomux conformance suite")
    group.addoption(
        "--iomux-driver",
        action="append",
        default=[],
        metavar="MODULE:CLASS",
        help="run the conformance suite on this Multiplexer subclass (repeatable)",
    )
    group.addoption(
        "--iomux-backend",
        action="append",
        default=[],
        metavar="NAME",
        help="run the conformance suite on this registered backend (repeatable)",
    )


class DriverUnderTest:
    """A driver the suite runs on: its name and how to get its class."""

    def __init__(self, label: str, *, spec: str | None = None, backend: str | None = None):
        self.label = label
        self.spec = spec
        self.backend = backend

    def load(self) -> type[Multiplexer]:
        """Return the driver class, or fail the test saying why it cannot run."""
        if self.spec is not None:
            try:
                cls = load_driver(self.spec)
            except Exception as exc:  # report any import problem as a failure
                pytest.fail(f"cannot load driver {self.spec}: {exc}", pytrace=False)
            reason = cls.probe()
            if reason is not None:
                pytest.fail(f"driver {self.spec} cannot run here: {reason}", pytrace=False)
            return cls
        assert self.backend is not None
        info = backend_info(self.backend)
        if not info.available or info.driver is None:
            where = "built-in " if info.origin == "builtin" else ""
            pytest.fail(
                f"{where}backend {self.backend} is unavailable on {sys.platform}: {info.reason}",
                pytrace=False,
            )
        return info.driver


def drivers_under_test(config: pytest.Config) -> list[DriverUnderTest]:
    """The drivers selected by the command-line options."""
    specs: list[str] = config.getoption("--iomux-driver")
    names: list[str] = config.getoption("--iomux-backend")
    chosen = [DriverUnderTest(spec.rpartition(":")[2], spec=spec) for spec in specs]
    chosen += [DriverUnderTest(name, backend=name) for name in names]
    return chosen or [DriverUnderTest(name, backend=name) for name in AUTO_ORDER]


#: The id and summary label of stock asyncio, the reference of the asyncio section.
REFERENCE = "asyncio"


class LoopKind:
    """An event loop the asyncio section runs on: stock asyncio or iomux's over a driver."""

    def __init__(self, label: str, driver: DriverUnderTest | None = None) -> None:
        self.label = label
        self.driver = driver

    @property
    def is_reference(self) -> bool:
        """Whether this is stock asyncio, the reference."""
        return self.driver is None

    def new_loop(self) -> asyncio.AbstractEventLoop:
        """A new, not yet running loop of this kind (fails the test if the driver cannot run)."""
        if self.driver is None:
            return asyncio.SelectorEventLoop()
        import iomux

        cls = self.driver.load()
        loop = iomux.new_event_loop(cast(Any, cls))
        backend = getattr(loop, "backend", None)
        if backend != cls.name:
            loop.close()
            pytest.fail(
                f"iomux.new_event_loop({cls.__name__}) runs on backend {backend!r}, "
                f"not {cls.name!r}",
                pytrace=False,
            )
        return loop

    def __repr__(self) -> str:
        return f"LoopKind({self.label!r})"


def loop_kinds(config: pytest.Config) -> list[LoopKind]:
    """Stock asyncio, then iomux's loop on every driver under test."""
    return [LoopKind(REFERENCE)] + [LoopKind(d.label, d) for d in drivers_under_test(config)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise over the drivers (``driver_under_test``) or the loops (``loop_kind``)."""
    if "driver_under_test" in metafunc.fixturenames:
        chosen = drivers_under_test(metafunc.config)
        metafunc.parametrize(
            "driver_under_test", chosen, ids=[d.label for d in chosen], scope="session"
        )
    if "loop_kind" in metafunc.fixturenames:
        kinds = loop_kinds(metafunc.config)
        metafunc.parametrize("loop_kind", kinds, ids=[k.label for k in kinds], scope="session")


@pytest.fixture
def aio_guard() -> Iterator[None]:
    """Fail the test if it hangs, or if it leaves fds, threads or child processes behind."""
    from .aio_support import LeakCheck, Watchdog

    leaks = LeakCheck()
    with Watchdog():
        yield
    leaks.check()


@pytest.fixture
def aio_loop_factory(
    loop_kind: LoopKind, aio_guard: None
) -> Iterator[Callable[[], asyncio.AbstractEventLoop]]:
    """Make new loops of ``loop_kind``; any the test leaves open are closed afterwards."""
    from .aio_support import close_loop

    made: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    def factory() -> asyncio.AbstractEventLoop:
        loop = loop_kind.new_loop()
        made.append(weakref.ref(loop))
        return loop

    yield factory
    for ref in made:
        loop = ref()
        if loop is not None:
            close_loop(loop)


@pytest.fixture
def aio_loop(
    aio_loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> Iterator[asyncio.AbstractEventLoop]:
    """A fresh event loop of ``loop_kind``; closed afterwards, and checked for leaks."""
    from .aio_support import close_loop

    loop = aio_loop_factory()
    try:
        yield loop
    finally:
        close_loop(loop)


@pytest.fixture(scope="session")
def driver(driver_under_test: DriverUnderTest) -> type[Multiplexer]:
    """The Multiplexer subclass under test."""
    return driver_under_test.load()


@pytest.fixture
def mux(driver: type[Multiplexer]) -> Iterator[Multiplexer]:
    """A fresh multiplexer of the driver under test, closed afterwards."""
    instance = driver()
    try:
        yield instance
    finally:
        instance.close()


#: The loop's kinds of I/O; event-loop tests run once per kind.
REACTOR_IO = ("readiness", "completion")


@pytest.fixture(params=REACTOR_IO)
def reactor_io(driver: type[Multiplexer], request: pytest.FixtureRequest) -> str:
    """The loop's kind of I/O under test; completion is skipped where not declared."""
    if request.param == "completion":
        require_completion(driver)
    return str(request.param)


def require_completion(driver: type[Multiplexer] | Multiplexer) -> None:
    """Skip the calling test, naming the capability, if ``driver`` lacks completion I/O."""
    if not driver.capabilities.completion:
        pytest.skip(f"{driver.name} declares no capability completion")


def require(driver: type[Multiplexer] | Multiplexer, trigger: Trigger) -> None:
    """Skip the calling test, naming the capability, if ``driver`` lacks ``trigger``."""
    if trigger not in driver.capabilities.triggers:
        pytest.skip(f"{driver.name} declares no capability trigger={trigger.value}")


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say which drivers the suite runs on."""
    labels: list[Any] = [d.label for d in drivers_under_test(config)]
    return [
        f"iomux conformance drivers: {', '.join(labels)}",
        f"asyncio section loops: {REFERENCE} (reference), {', '.join(labels)}",
    ]
