"""setuptools glue: adds the optional C extensions.

Everything else about the package is declared in ``pyproject.toml``.

- ``iomux.drivers._liburing`` (cffi): without liburing's headers (or with a
  liburing older than 2.3) the build warns and goes on, and iomux installs
  with its other drivers; the io_uring driver then reports why it is
  unavailable.
- ``iomux.reactor._speedups`` (the loop's event dispatch and scheduling)
  and ``iomux._ready`` (the per-event loop of ``Multiplexer.ready()``),
  plain C against Python's API: without a compiler the same code runs in
  Python.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from typing import Any

from setuptools import Extension, setup  # type: ignore[import-untyped,unused-ignore]

HERE = os.path.dirname(os.path.abspath(__file__))


def uring_extension() -> Any:
    """The Extension built from ``drivers/_uring_build.py``, or None if cffi is missing."""
    path = os.path.join(HERE, "drivers", "_uring_build.py")
    spec = importlib.util.spec_from_file_location("_iomux_uring_build", path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:  # cffi itself is absent: nothing can be built
        warnings.warn(f"iomux: not building the io_uring extension: {exc}", stacklevel=1)
        return None
    # Writes the generated C source under build/ and describes how to
    # compile it; compiling happens in build_ext, which skips an optional
    # extension that fails (e.g. liburing.h missing) with a warning.
    ext = module.ffibuilder.distutils_extension(tmpdir=os.path.join("build", "cffi"), verbose=False)
    ext.optional = True
    return ext


_speedups = Extension(
    "iomux.reactor._speedups", [os.path.join("iomux", "reactor", "_speedups.c")], optional=True
)
_ready = Extension("iomux._ready", [os.path.join("iomux", "_ready.c")], optional=True)
_ext = uring_extension() if sys.platform.startswith("linux") else None
setup(ext_modules=[_speedups, _ready] + ([_ext] if _ext is not None else []))
