"""Reversible method patches (a guest in LangChain's classes: idempotent install, exact uninstall).

Each patch replaces one attribute of a LangChain class with a wrapper that carries a marker; an
uninstall restores the original only if the attribute is still our wrapper (someone else may have
wrapped it after us, and we must not unwrap them).

Example:
    >>> class A:
    ...     def f(self) -> int: return 1
    >>> p = Patch(A, "f", lambda orig: lambda self: orig(self) + 1)
    >>> p.install(); p.install(); A().f()
    2
    >>> p.uninstall(); A().f()
    1
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

_MARK = "__musubi_patch__"


class Patch:
    """One attribute patch: ``make(original) -> wrapper``."""

    def __init__(self, owner: type, name: str, make: Callable[[Any], Any]) -> None:
        self.owner, self.name, self.make = owner, name, make
        self._original: Any = None
        self._wrapper: Any = None
        self._lock = threading.Lock()

    @property
    def installed(self) -> bool:
        return self._wrapper is not None and self.owner.__dict__.get(self.name) is self._wrapper

    def install(self) -> None:
        with self._lock:
            if self.installed:
                return
            original = self.owner.__dict__.get(self.name)
            wrapper = self.make(getattr(self.owner, self.name))
            setattr(wrapper, _MARK, True)
            self._original = original
            self._wrapper = wrapper
            setattr(self.owner, self.name, wrapper)

    def uninstall(self) -> None:
        with self._lock:
            if self._wrapper is None:
                return
            if self.owner.__dict__.get(self.name) is self._wrapper:
                if self._original is None:
                    delattr(self.owner, self.name)
                else:
                    setattr(self.owner, self.name, self._original)
            self._wrapper = None
            self._original = None
