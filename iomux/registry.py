"""Which drivers exist, which can run here, and which one a program gets.

A backend is chosen, in order of precedence, by the explicit argument, the
``IOMUX_BACKEND`` environment variable, the config file, then ``auto``. A
value is a driver name, ``auto`` (the best available of io_uring, epoll,
poll, select), or a comma-separated preference list such as
``io_uring,epoll``. A single explicit name that cannot run here raises
:class:`~iomux.errors.BackendUnavailable` with the reason; ``auto`` and lists
fall back, and the resulting :class:`Selection` records why each skipped
driver was skipped.

The config file is the first of: the path in ``IOMUX_CONFIG``, ``iomux.toml``
in the current directory, ``$XDG_CONFIG_HOME/iomux/config.toml`` (default
``~/.config/iomux/config.toml``). It is TOML with one key: ``backend = "..."``.

Third-party drivers are found through the entry-point group
``iomux.drivers``: the entry point's name is the backend name and its value a
``module:Class`` of a :class:`~iomux.Multiplexer` subclass.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import BackendUnavailable, IomuxError, UnknownBackend
from .multiplexer import Capabilities, Multiplexer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

BUILTIN: dict[str, str] = {
    "io_uring": "iomux.drivers.io_uring:IoUringDriver",
    "epoll": "iomux.drivers.epoll:EpollDriver",
    "poll": "iomux.drivers.poll:PollDriver",
    "select": "iomux.drivers.select:SelectDriver",
}
#: The order ``auto`` tries the built-in drivers in.
AUTO_ORDER: tuple[str, ...] = ("io_uring", "epoll", "poll", "select")
ENV_VAR = "IOMUX_BACKEND"
CONFIG_ENV_VAR = "IOMUX_CONFIG"
ENTRY_POINT_GROUP = "iomux.drivers"


@dataclass(frozen=True)
class BackendInfo:
    """One known backend: whether it can run here and what it can do."""

    name: str
    available: bool
    #: Why it cannot run here, in words a user can act on ("" when available).
    reason: str
    #: Where it comes from: "builtin" or "entry point module:Class".
    origin: str
    driver: type[Multiplexer] | None = None
    capabilities: Capabilities | None = None
    flaws: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The info as plain JSON-friendly values."""
        return {
            "name": self.name,
            "available": self.available,
            "reason": self.reason,
            "origin": self.origin,
            "capabilities": self.capabilities.as_dict() if self.capabilities else None,
            "flaws": list(self.flaws),
            "details": dict(self.details),
        }


@dataclass(frozen=True)
class Selection:
    """The outcome of choosing a backend: who won, asked for by whom, who was skipped."""

    name: str
    driver: type[Multiplexer]
    #: The value that was resolved, e.g. "auto" or "io_uring,epoll".
    requested: str
    #: Where that value came from: "argument", "IOMUX_BACKEND", "config file PATH", "default".
    source: str
    #: (name, reason) for each preferred backend passed over.
    skipped: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        """One line saying which backend was chosen and why."""
        text = f"backend {self.name} (requested {self.requested!r} by {self.source})"
        if self.skipped:
            text += "; skipped " + "; ".join(f"{n}: {r}" for n, r in self.skipped)
        return text


def _entry_points() -> dict[str, str]:
    found: dict[str, str] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def known_specs() -> dict[str, tuple[str, str]]:
    """Map every backend name to ``(module:Class, origin)``; built-ins win clashes."""
    specs = {name: (spec, "builtin") for name, spec in BUILTIN.items()}
    for name, spec in _entry_points().items():
        specs.setdefault(name, (spec, f"entry point {spec}"))
    return specs


def load_driver(spec: str) -> type[Multiplexer]:
    """Import ``module:Class`` and check that it is a Multiplexer subclass."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"driver spec {spec!r} must look like 'package.module:ClassName'")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Multiplexer)):
        raise TypeError(f"{spec} is {obj!r}, not a subclass of iomux.Multiplexer")
    return obj


def _shadow_hint(exc: Exception) -> str:
    """Explain a missing ``iomux.drivers`` when a source checkout shadows the install."""
    if not isinstance(exc, ModuleNotFoundError) or exc.name != "iomux.drivers":
        return ""
    package = Path(__file__).resolve().parent
    if not (package.parent / "drivers" / "__init__.py").is_file():
        return ""
    return (
        f" (iomux is imported from the source checkout {package.parent}, whose drivers/ "
        "is only mapped to iomux.drivers by an install: run `pip install -e .` there, "
        "or run Python from another directory)"
    )


_probe_cache: dict[str, BackendInfo] = {}


def backend_info(name: str) -> BackendInfo:
    """Return the :class:`BackendInfo` of one backend; UnknownBackend if none."""
    if name in _probe_cache:
        return _probe_cache[name]
    specs = known_specs()
    if name not in specs:
        raise UnknownBackend(name, list(specs))
    spec, origin = specs[name]
    try:
        driver = load_driver(spec)
    except Exception as exc:  # any import failure makes it unavailable
        info = BackendInfo(name, False, f"cannot load {spec}: {exc}{_shadow_hint(exc)}", origin)
    else:
        try:
            reason = driver.probe()
        except Exception as exc:  # a probe that crashes is a reason too
            reason = f"probe failed: {type(exc).__name__}: {exc}"
        info = BackendInfo(
            name,
            reason is None,
            reason or "",
            origin,
            driver,
            driver.capabilities,
            tuple(driver.flaws),
            driver.details() if reason is None else {},
        )
    _probe_cache[name] = info
    return info


def backends() -> list[BackendInfo]:
    """Every known backend, built-in ones first in ``auto`` order."""
    names = list(AUTO_ORDER) + [n for n in known_specs() if n not in AUTO_ORDER]
    return [backend_info(n) for n in names]


def forget_probes() -> None:
    """Drop cached availability results (after changing what a probe sees)."""
    _probe_cache.clear()


def config_path() -> Path | None:
    """The config file that would be read, or None if there is none."""
    explicit = os.environ.get(CONFIG_ENV_VAR)
    if explicit:
        return Path(explicit)
    local = Path("iomux.toml")
    if local.is_file():
        return local
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    user = Path(base) / "iomux" / "config.toml"
    return user if user.is_file() else None


def _config_backend(path: Path) -> str | None:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise IomuxError(f"config file {path} (from ${CONFIG_ENV_VAR}) does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise IomuxError(f"config file {path} is not valid TOML: {exc}") from None
    value = data.get("backend")
    if value is None:
        return None
    if not isinstance(value, str):
        raise IomuxError(f"config file {path}: 'backend' must be a string, not {value!r}")
    return value


def requested_backend(backend: str | None = None) -> tuple[str, str]:
    """Return ``(value, source)``: what is asked for, by precedence."""
    if backend:
        return backend, "argument"
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return env, ENV_VAR
    path = config_path()
    if path is not None:
        value = _config_backend(path)
        if value:
            return value, f"config file {path}"
    return "auto", "default"


def choose(backend: str | type[Multiplexer] | None = None) -> Selection:
    """Resolve a backend request into a driver class without opening it."""
    if isinstance(backend, type):
        if not issubclass(backend, Multiplexer):
            raise TypeError(f"{backend!r} is not a subclass of iomux.Multiplexer")
        reason = backend.probe()
        if reason is not None:
            raise BackendUnavailable(backend.name, reason)
        return Selection(backend.name, backend, backend.__name__, "argument")
    value, source = requested_backend(backend)
    names = [part.strip() for part in value.split(",") if part.strip()]
    if not names:
        raise UnknownBackend(value, list(known_specs()))
    known = known_specs()
    for name in names:
        if name != "auto" and name not in known:
            raise UnknownBackend(name, list(known))
    if len(names) == 1 and names[0] != "auto":
        info = backend_info(names[0])
        if not info.available or info.driver is None:
            raise BackendUnavailable(info.name, info.reason)
        return Selection(info.name, info.driver, value, source)
    skipped: list[tuple[str, str]] = []
    for name in names:
        for candidate in AUTO_ORDER if name == "auto" else (name,):
            info = backend_info(candidate)
            if info.available and info.driver is not None:
                return Selection(info.name, info.driver, value, source, tuple(skipped))
            skipped.append((candidate, info.reason))
    reasons = "; ".join(f"{n}: {r}" for n, r in skipped)
    raise BackendUnavailable(value, f"no backend in the list can run here ({reasons})")


def open_multiplexer(backend: str | type[Multiplexer] | None = None, **options: Any) -> Multiplexer:
    """Open a multiplexer on the chosen backend (see the module documentation).

    ``options`` go to the driver's constructor. The returned multiplexer's
    ``selection`` attribute says which backend won and why.
    """
    selection = choose(backend)
    mux = selection.driver(**options)
    mux.selection = selection
    return mux
