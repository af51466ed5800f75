from collections.abc import Callable
from typing import Any

RECORD_SIZE: int
SEND_PAIR_SIZE: int

class Dispatcher:
    """Dispatches one iteration's completion events (see ``_speedups.c``)."""

    def __init__(
        self,
        cls: type,
        slots: list[Any],
        handle: Callable[[int, int, int, int], object],
        failed: Callable[[Any, BaseException], object],
    ) -> None: ...
    def __call__(self, records: Any, data: Any, /) -> None: ...

class ReadyDispatcher:
    """Dispatches one iteration's readiness events (see ``_speedups.c``)."""

    def __init__(
        self,
        cls: type,
        handle: Callable[[Any, int], object],
        read_failed: Callable[[Any, BaseException], object],
        failed: Callable[[Any, BaseException], object],
        read_size: int,
    ) -> None: ...
    def __call__(self, events: Any, /) -> None: ...

class WriteMethod:
    """A readiness stream transport's ``write()`` (see ``_speedups.c``)."""

    def __init__(
        self,
        cls: type,
        slow: Callable[[Any, Any], None],
        rest: Callable[[Any, bytes, int], None],
        failed: Callable[[Any, BaseException], object],
    ) -> None: ...
    def __call__(self, transport: Any, data: Any, /) -> None: ...
    def __get__(self, obj: Any, owner: type | None = None) -> Any: ...

class StageWriteMethod:
    """A completion stream transport's ``write()`` (see ``_speedups.c``)."""

    def __init__(
        self,
        cls: type,
        slow: Callable[[Any, Any], None],
        check_pause: Callable[[Any], None],
    ) -> None: ...
    def __call__(self, transport: Any, data: Any, /) -> None: ...
    def __get__(self, obj: Any, owner: type | None = None) -> Any: ...
