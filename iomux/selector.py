"""``iomux.Selector``: the :mod:`selectors` interface over any iomux driver.

Code written for ``selectors`` (asyncio's ``SelectorEventLoop`` among it)
runs unchanged on select, poll, epoll or io_uring. The exceptions are the
ones ``selectors`` raises: KeyError for unknown or duplicate files,
ValueError for bad files or events, RuntimeError once closed.
"""

from __future__ import annotations

import selectors
from collections.abc import Mapping
from typing import Any

from .multiplexer import Interest, Multiplexer
from .registry import open_multiplexer


class _KeyMap(Mapping[Any, selectors.SelectorKey]):
    """The file-to-key mapping of a Selector; empty once the selector is closed."""

    def __init__(self, selector: Selector) -> None:
        self._selector = selector

    def __len__(self) -> int:
        return len(self._selector._keys)

    def __getitem__(self, fileobj: Any) -> selectors.SelectorKey:
        return self._selector._key_of(fileobj)

    def __iter__(self) -> Any:
        return iter(self._selector._keys)


class Selector(selectors.BaseSelector):
    """A ``selectors.BaseSelector`` backed by an iomux multiplexer.

    ``backend`` is chosen as for :func:`iomux.open_multiplexer`; an open
    :class:`~iomux.Multiplexer` may be passed instead.
    """

    def __init__(self, backend: str | Multiplexer | None = None, **options: Any) -> None:
        if isinstance(backend, Multiplexer):
            self._mux = backend
        else:
            self._mux = open_multiplexer(backend, **options)
        self._keys: dict[int, selectors.SelectorKey] = {}
        self._map = _KeyMap(self)

    @property
    def multiplexer(self) -> Multiplexer:
        """The underlying multiplexer."""
        return self._mux

    @property
    def backend(self) -> str:
        """The name of the backend in use."""
        return self._mux.name

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        """Register ``fileobj`` for ``events``; see ``selectors.BaseSelector``."""
        self._check_events(events)
        reg = self._mux.register(fileobj, Interest(events))
        key = selectors.SelectorKey(fileobj, reg.fd, events, data)
        self._keys[reg.fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        """Unregister ``fileobj``; see ``selectors.BaseSelector``."""
        reg = self._mux.unregister(fileobj)
        return self._keys.pop(reg.fd)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        """Change events and/or data; a data-only change does not touch the kernel."""
        self._check_events(events)
        reg = self._mux[fileobj]
        old = self._keys[reg.fd]
        if events != old.events:
            self._mux.modify(fileobj, Interest(events))
        key = old._replace(events=events, data=data)
        self._keys[reg.fd] = key
        return key

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        """Wait and return ``(key, events)`` pairs, as ``selectors`` does."""
        keys = self._keys
        ready = []
        for fd, mask, _ in self._mux.poll(timeout):
            key = keys.get(fd)
            if key is not None:
                ready.append((key, int(mask) & key.events))
        return ready

    def _key_of(self, fileobj: Any) -> selectors.SelectorKey:
        """The key of ``fileobj``; KeyError if it is not registered (or the selector closed)."""
        if self._mux.closed:
            raise KeyError(f"{fileobj!r} is not registered (the selector is closed)")
        return self._keys[self._mux[fileobj].fd]

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        """Return the key of ``fileobj``; KeyError if it is not registered."""
        mapping = self.get_map()
        if mapping is None:
            raise RuntimeError("Selector is closed")
        return mapping[fileobj]

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        """Return the file-to-key mapping (None once closed, as selectors does)."""
        return None if self._mux.closed else self._map  # type: ignore[return-value]

    def close(self) -> None:
        """Close the underlying multiplexer."""
        self._keys.clear()
        self._mux.close()

    @staticmethod
    def _check_events(events: int) -> None:
        if not events or events & ~(selectors.EVENT_READ | selectors.EVENT_WRITE):
            raise ValueError(f"Invalid events: {events!r}")
