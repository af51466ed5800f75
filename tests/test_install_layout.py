"""iomux imports and works whatever is missing: the io_uring extension, or the drivers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

BLOCK = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == {name!r} or name.startswith({name!r} + "."):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Block())
"""


def _run_without(module: str, code: str) -> dict[str, object]:
    script = BLOCK.format(name=module) + textwrap.dedent(code)
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "IOMUX_BACKEND": ""},
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_without_the_io_uring_extension_the_other_backends_work() -> None:
    got = _run_without(
        "iomux.drivers._liburing",
        """
        import json
        import iomux
        infos = {b.name: (b.available, b.reason) for b in iomux.backends()}
        with iomux.open_multiplexer() as mux:
            auto = mux.name
        reactor = iomux.Reactor("epoll")
        reactor.close()
        print(json.dumps({"infos": infos, "auto": auto}))
        """,
    )
    infos: dict[str, list[object]] = got["infos"]  # type: ignore[assignment]
    assert infos["io_uring"][0] is False
    assert "liburing-dev" in str(infos["io_uring"][1])
    assert all(infos[name][0] for name in ("epoll", "poll", "select"))
    assert got["auto"] == "epoll"


def test_without_the_drivers_import_iomux_still_works_and_says_why() -> None:
    got = _run_without(
        "iomux.drivers",
        """
        import json
        import iomux
        infos = {b.name: (b.available, b.reason) for b in iomux.backends()}
        try:
            iomux.open_multiplexer()
        except iomux.BackendUnavailable as exc:
            error = str(exc)
        print(json.dumps({"infos": infos, "error": error}))
        """,
    )
    infos: dict[str, list[object]] = got["infos"]  # type: ignore[assignment]
    assert not any(available for available, _ in infos.values())
    assert all("iomux.drivers" in str(reason) for _, reason in infos.values())
    assert "no backend in the list can run here" in str(got["error"])
