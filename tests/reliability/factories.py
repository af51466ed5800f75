"""Protocol factories for the reliability tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

P = TypeVar("P", bound=asyncio.BaseProtocol)


def keeping(made: list[P], make: Callable[[], P]) -> Callable[[], asyncio.BaseProtocol]:
    """A protocol factory calling ``make()`` and appending each protocol to ``made``."""

    def factory() -> asyncio.BaseProtocol:
        made.append(make())
        return made[-1]

    return factory
