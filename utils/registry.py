"""A registry of named classes: a decorator registers, one function creates by name with
keyword arguments, one lists names. The same registry drives the command line, the YAML
lookup, the Python API and the contract tests.

Method files are discovered by importing every module of their package, so a new method
is registered by adding its file. Running a method file as a script (``python
defense/sau.py``) executes it a second time as ``__main__``; that copy does not replace
the registered class.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable, ClassVar, Generic, Iterable, TypeVar

from utils import config as cfg
from utils.errors import unknown_name

T = TypeVar("T")


class Method:
    """What attacks and defenses share: a registered name, the paper, and hyperparameters
    declared as annotated keyword arguments of ``__init__`` with the paper's defaults,
    each kept as an attribute of the same name. ``param_aliases`` and ``param_checks``
    add command-line aliases and value checks; ``smoke_params`` are the hyperparameters of
    a seconds-long run on digits (contract tests, smoke grids)."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    param_aliases: ClassVar[dict[str, tuple[str, ...]]] = {}
    param_checks: ClassVar[dict[str, Callable[[Any], str | None]]] = {}
    smoke_params: ClassVar[dict[str, Any]] = {}

    @classmethod
    def params(cls) -> list[cfg.Param]:
        return cfg.params_from_signature(cls, cls.param_aliases, cls.param_checks)

    def hyperparameters(self) -> dict[str, Any]:
        return cfg.hyperparameters_of(self)


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._classes: dict[str, type[T]] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *, aliases: Iterable[str] = ()):
        """Class decorator: register under ``name`` (and ``aliases``); sets ``cls.name``."""

        def wrap(cls: type[T]) -> type[T]:
            existing = self._classes.get(name)
            if existing is not None and existing is not cls:
                if cls.__module__ == "__main__" or existing.__qualname__ == cls.__qualname__ and \
                        existing.__module__.rsplit(".", 1)[-1] == cls.__module__.rsplit(".", 1)[-1]:
                    return cls  # the same file run as a script; keep the package's class
                raise ValueError(f"{self.kind} '{name}' is registered twice ({existing.__module__}, {cls.__module__})")
            cls.name = name  # type: ignore[attr-defined]
            self._classes[name] = cls
            for alias in aliases:
                self._aliases[alias] = name
            return cls

        return wrap

    def canonical(self, name: str) -> str:
        name = self._aliases.get(name, name)
        if name not in self._classes:
            raise unknown_name(self.kind, name, [*self._classes, *self._aliases])
        return name

    def get(self, name: str) -> type[T]:
        return self._classes[self.canonical(name)]

    def create(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __contains__(self, name: str) -> bool:
        return self._aliases.get(name, name) in self._classes

    def unregister(self, name: str) -> None:
        """Remove ``name`` and its aliases (tests register throwaway methods)."""
        self._classes.pop(name, None)
        for alias in [a for a, n in self._aliases.items() if n == name]:
            del self._aliases[alias]


def import_package_modules(package: str, skip: Iterable[str] = ()) -> None:
    """Import every module of ``package`` (except ``skip``) so that they register."""
    pkg = importlib.import_module(package)
    skip = set(skip)
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in skip and not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
