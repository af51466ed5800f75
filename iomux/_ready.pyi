from collections.abc import Callable, Iterable
from typing import Any

def collect(
    pairs: Iterable[tuple[int, int]],
    want: dict[int, int],
    masks: dict[int, int],
    registrations: dict[int, Any],
    translate: Callable[[int], int],
    waker_fd: int,
    events: list[Any],
    /,
) -> bool:
    """Append ``(fd, mask, data)`` for each pair of a registered fd that wants it; True
    where the waker's fd was among the pairs (see ``_ready.c``)."""
