"""Whether iomux uses its optional C extensions: ``IOMUX_SPEEDUPS``.

iomux builds small C extensions with the package where a compiler is
(``iomux._ready`` for :meth:`iomux.Multiplexer.ready`, ``iomux.reactor._speedups``
for the event loop); each has a Python equivalent that runs where it is not
built. ``IOMUX_SPEEDUPS=0`` in the environment makes iomux use the Python
code, to compare the two or to rule the extensions out.
"""

from __future__ import annotations

import os

#: The environment variable that turns the C extensions off (``0``).
SPEEDUPS_ENV = "IOMUX_SPEEDUPS"


def enabled() -> bool:
    """False where ``IOMUX_SPEEDUPS=0``: the Python code is to be used."""
    return os.environ.get(SPEEDUPS_ENV, "1").strip() != "0"
