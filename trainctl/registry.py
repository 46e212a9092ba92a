"""A registry maps the option names of a closed set (optimizers, schedulers, ...) to small records.

An unknown name fails with the list of valid ones and the closest match; tests parametrize over
:meth:`Registry.names`.
"""

from __future__ import annotations

from typing import Dict, Generic, Iterator, TypeVar

from trainctl.errors import ConfigError, did_you_mean, suggestion

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry for one config group (``group`` is the key users override, e.g. ``optimizer``)."""

    def __init__(self, group: str) -> None:
        self.group = group
        self._entries: Dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.group} '{name}' is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        if name not in self._entries:
            close = did_you_mean(name, self._entries, 1)
            raise ConfigError(
                self.group,
                f"unknown {self.group} '{name}'.{suggestion(name, self._entries)} "
                f"Available: {', '.join(self.names())}",
                f"set {self.group}={close[0] if close else self.names()[0]}",
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self._entries.items()))
