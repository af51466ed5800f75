"""Backend discovery and the precedence of argument, environment, config file and auto."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import iomux
from iomux import registry
from iomux.drivers.epoll import EpollDriver
from iomux.drivers.io_uring import IoUringDriver
from iomux.drivers.poll import PollDriver


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.delenv("IOMUX_BACKEND", raising=False)
    monkeypatch.delenv("IOMUX_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    registry.forget_probes()
    yield
    registry.forget_probes()


def _unavailable(monkeypatch: pytest.MonkeyPatch, cls: type[iomux.Multiplexer], why: str) -> None:
    monkeypatch.setattr(cls, "probe", classmethod(lambda c: why))
    registry.forget_probes()


def test_backends_lists_builtins_in_auto_order() -> None:
    names = [b.name for b in iomux.backends()]
    assert names[:4] == ["io_uring", "epoll", "poll", "select"]
    for info in iomux.backends():
        assert info.available == (info.reason == "")
        d = info.as_dict()
        assert {"name", "available", "reason", "capabilities"} <= set(d)


def test_explicit_name() -> None:
    with iomux.open_multiplexer("poll") as mux:
        assert isinstance(mux, PollDriver)
        assert mux.selection.source == "argument"


def test_driver_class_as_backend() -> None:
    with iomux.open_multiplexer(EpollDriver) as mux:
        assert isinstance(mux, EpollDriver)


def test_env_var_then_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOMUX_BACKEND", "select")
    with iomux.open_multiplexer() as mux:
        assert mux.name == "select" and mux.selection.source == "IOMUX_BACKEND"
    with iomux.open_multiplexer("poll") as mux:
        assert mux.name == "poll"


def test_config_file_below_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "conf.toml"
    cfg.write_text('backend = "poll"\n')
    monkeypatch.setenv("IOMUX_CONFIG", str(cfg))
    sel = iomux.choose()
    assert sel.name == "poll" and sel.source == f"config file {cfg}"
    monkeypatch.setenv("IOMUX_BACKEND", "select")
    assert iomux.choose().name == "select"


def test_config_file_locations(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    user = tmp_path / "xdg" / "iomux" / "config.toml"
    user.parent.mkdir(parents=True)
    user.write_text('backend = "select"\n')
    assert iomux.choose().name == "select"
    (tmp_path / "iomux.toml").write_text('backend = "poll"\n')
    assert iomux.choose().name == "poll"  # the current directory wins over the user's


def test_bad_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("backend = \n")
    monkeypatch.setenv("IOMUX_CONFIG", str(cfg))
    with pytest.raises(iomux.IomuxError, match="not valid TOML"):
        iomux.choose()
    monkeypatch.setenv("IOMUX_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(iomux.IomuxError, match="does not exist"):
        iomux.choose()
    cfg.write_text("backend = 3\n")
    monkeypatch.setenv("IOMUX_CONFIG", str(cfg))
    with pytest.raises(iomux.IomuxError, match="must be a string"):
        iomux.choose()


def test_unknown_name_lists_known() -> None:
    with pytest.raises(iomux.UnknownBackend) as info:
        iomux.open_multiplexer("kqueue")
    assert "kqueue" in str(info.value) and "epoll" in str(info.value)
    with pytest.raises(iomux.UnknownBackend):
        iomux.choose("epoll,kqueue")
    with pytest.raises(iomux.UnknownBackend):
        iomux.choose(" , ")


def test_explicit_unavailable_raises_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    _unavailable(monkeypatch, EpollDriver, "epoll is switched off for this test")
    with pytest.raises(iomux.BackendUnavailable, match="switched off for this test"):
        iomux.open_multiplexer("epoll")


def test_list_falls_back_and_records_why(monkeypatch: pytest.MonkeyPatch) -> None:
    _unavailable(monkeypatch, EpollDriver, "epoll is switched off for this test")
    sel = iomux.choose("epoll,poll")
    assert sel.name == "poll"
    assert sel.skipped == (("epoll", "epoll is switched off for this test"),)
    assert "skipped epoll" in sel.describe()


def test_auto_picks_best_available(monkeypatch: pytest.MonkeyPatch) -> None:
    sel = iomux.choose("auto")
    best = next(b for b in iomux.backends() if b.available)
    assert sel.name == best.name
    _unavailable(monkeypatch, IoUringDriver, "ring off")
    _unavailable(monkeypatch, EpollDriver, "off")
    sel = iomux.choose()
    assert sel.name == "poll"
    assert sel.skipped == (("io_uring", "ring off"), ("epoll", "off"))
    assert sel.source == "default"


def test_list_with_nothing_available(monkeypatch: pytest.MonkeyPatch) -> None:
    _unavailable(monkeypatch, EpollDriver, "off")
    _unavailable(monkeypatch, PollDriver, "also off")
    with pytest.raises(iomux.BackendUnavailable, match="epoll: off; poll: also off"):
        iomux.choose("epoll,poll")


def test_third_party_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        registry, "_entry_points", lambda: {"mypoll": "iomux.drivers.poll:PollDriver"}
    )
    info = registry.backend_info("mypoll")
    assert info.available and info.origin == "entry point iomux.drivers.poll:PollDriver"
    assert "mypoll" in [b.name for b in iomux.backends()]
    monkeypatch.setattr(registry, "_entry_points", lambda: {"broken": "no.such.module:X"})
    registry.forget_probes()
    info = registry.backend_info("broken")
    assert not info.available and "no.such.module" in info.reason
    with pytest.raises(iomux.BackendUnavailable, match=r"no\.such\.module"):
        iomux.choose("broken")


def test_load_driver_checks_spec() -> None:
    with pytest.raises(ValueError, match=r"package\.module:ClassName"):
        registry.load_driver("iomux.drivers.poll")
    with pytest.raises(TypeError, match="not a subclass"):
        registry.load_driver("iomux.registry:BackendInfo")
