"""A small name -> class registry, filled by decorators (as lm-eval registers models and tasks).

Entries are classes, never shared instances: each run builds its own object from validated args.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

from streambench.errors import UnknownNameError

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    def __init__(self, kind: str, base: type | None = None):
        self.kind = kind
        self.base = base
        self._entries: dict[str, T] = {}

    def register(self, *names: str) -> Callable[[T], T]:
        def decorate(cls: T) -> T:
            if self.base is not None and not issubclass(cls, self.base):
                raise TypeError(f"{cls.__name__} must subclass {self.base.__name__} to be a {self.kind}")
            for name in names:
                if name in self._entries and self._entries[name] is not cls:
                    raise ValueError(f"{self.kind} name '{name}' is already taken by {self._entries[name].__name__}")
                self._entries[name] = cls
            if not cls.__dict__.get("name"):  # a subclass does not inherit its parent's name
                cls.name = names[0]
            return cls

        return decorate

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'{hint} (known: {', '.join(self.names())})"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._entries.items())

    def __contains__(self, name: str) -> bool:
        return name in self._entries
