"""Name -> constructor tables that fill themselves at import time (methods, data sources,
evaluators), so that a config names what it wants and a typo lists the valid names."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """One kind of registered thing; `key` is the config field that names it, for messages."""

  def __init__(self, kind: str, key: str):
    self.kind, self.key = kind, key
    self._table: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator: registers a class or factory under `name`."""

    def wrap(obj: T) -> T:
      if name in self._table:
        raise ValueError(f"{self.kind.capitalize()} {name!r} is registered twice.")
      self._table[name] = obj
      return obj

    return wrap

  def names(self) -> list[str]:
    return sorted(self._table)

  def get(self, name: str) -> T:
    if name not in self._table:
      raise ValueError(f"Unknown {self.kind} {name!r} ({self.key}); valid choices: "
                       f"{', '.join(self.names())}.")
    return self._table[name]
