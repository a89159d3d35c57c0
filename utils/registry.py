"""A registry of named classes: a decorator registers, one function creates by name with
keyword arguments, one lists names. The same registry drives the command line, the YAML
lookup, the Python API and the contract tests.

Method files are discovered by importing every module of their package, so a new method
is registered by adding its file. Running a method file as a script (``python
defense/sau.py``) executes it a second time as ``__main__``; that copy does not replace
the registered class.

Methods of other installed packages register through entry points (:func:`load_plugins`):
a distribution that declares, in its packaging metadata,

    [project.entry-points."saubench.defenses"]
    my_defense = "my_package.my_defense:MyDefense"

has its class registered under ``my_defense`` when ``defense`` is imported (group
``saubench.attacks`` for attacks). The value may also name a module whose import
registers its classes with the decorator.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import pkgutil
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Generic, Iterable, TypeVar

from utils import config as cfg
from utils.errors import unknown_name

T = TypeVar("T")


class Method:
    """What attacks and defenses share: a registered name, the paper and its year, a kind
    (set by each side's base class), and hyperparameters declared as annotated keyword
    arguments of ``__init__`` with the paper's defaults, each kept as an attribute of the
    same name. ``param_aliases`` and ``param_checks`` add command-line aliases and value
    checks; ``smoke_params`` are the hyperparameters of a seconds-long run on digits
    (contract tests, smoke grids); ``params_added_later`` names hyperparameters added after
    results were saved whose default computes what those results computed (a stored
    config without one is taken to hold its default: see ``cfg.Param.absent_is_default``).
    The first line of the class docstring is the method's one-line summary (``--help``,
    ``python -m defense list``, the README's tables)."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    year: ClassVar[int | None] = None  # the paper's year
    kind: ClassVar[str] = ""
    param_aliases: ClassVar[dict[str, tuple[str, ...]]] = {}
    param_checks: ClassVar[dict[str, Callable[[Any], str | None]]] = {}
    smoke_params: ClassVar[dict[str, Any]] = {}
    params_added_later: ClassVar[frozenset[str]] = frozenset()

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        """Check the hyperparameters against ``param_checks`` on every route (the command
        line, YAML, ``create_defense``/``create_attack``, the class called directly): the
        one place. A failed check raises ValueError naming the hyperparameter."""
        cls.check_params(cls._arguments(args, kwargs))
        return super().__new__(cls)

    @classmethod
    def _arguments(cls, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The constructor's arguments by name, defaults filled in (what binds: a wrong
        call is left to ``__init__`` to refuse in Python's words)."""
        try:
            bound = inspect.signature(cls.__init__).bind_partial(None, *args, **kwargs)
        except TypeError:
            return {}
        bound.apply_defaults()
        return dict(bound.arguments)

    @classmethod
    def check_params(cls, values: dict[str, Any]) -> None:
        """Raise ValueError for the first hyperparameter in ``values`` that fails its
        ``param_checks`` entry."""
        for name, check in cls.param_checks.items():
            complaint = check(values[name]) if name in values else None
            if complaint:
                raise ValueError(f"{name} {complaint}, got {cfg.brief(values[name])}")

    @classmethod
    def params(cls) -> list[cfg.Param]:
        params = cfg.params_from_signature(cls, cls.param_aliases, cls.param_checks)
        unknown = set(cls.params_added_later) - {p.name for p in params}
        if unknown:
            raise TypeError(f"{cls.__name__}.params_added_later names no hyperparameter: {sorted(unknown)}")
        return [replace(p, absent_is_default=p.name in cls.params_added_later) for p in params]

    def hyperparameters(self) -> dict[str, Any]:
        return cfg.hyperparameters_of(self)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The hyperparameters' defaults, by name (``cfg.REQUIRED`` where there is none)."""
        return {p.name: p.default for p in cls.params()}

    @classmethod
    def summary(cls) -> str:
        """The first line of the class docstring."""
        doc = inspect.cleandoc(cls.__doc__ or "")
        return doc.splitlines()[0].strip() if doc else ""


class Registry(Generic[T]):
    """The methods of one side (``"attack"`` or ``"defense"``: ``side``), by name. A
    method's ``kind`` is its category within its side (mitigation, dirty-label, ...)."""

    def __init__(self, side: str):
        self.side = side
        self._classes: dict[str, type[T]] = {}
        self._aliases: dict[str, str] = {}

    @property
    def kind(self) -> str:
        """Deprecated name of :attr:`side` (``kind`` is a method's category)."""
        return self.side

    def register(self, name: str, *, aliases: Iterable[str] = ()):
        """Class decorator: register under ``name`` (and ``aliases``); sets ``cls.name``."""

        def wrap(cls: type[T]) -> type[T]:
            existing = self._classes.get(name)
            if existing is not None and existing is not cls:
                if (
                    cls.__module__ == "__main__"
                    or existing.__qualname__ == cls.__qualname__
                    and existing.__module__.rsplit(".", 1)[-1] == cls.__module__.rsplit(".", 1)[-1]
                ):
                    return cls  # the same file run as a script; keep the package's class
                raise ValueError(f"{self.side} '{name}' is registered twice ({existing.__module__}, {cls.__module__})")
            cls.name = name  # type: ignore[attr-defined]
            self._classes[name] = cls
            for alias in aliases:
                self._aliases[alias] = name
            return cls

        return wrap

    def canonical(self, name: str) -> str:
        name = self._aliases.get(name, name)
        if name not in self._classes:
            raise unknown_name(self.side, name, [*self._classes, *self._aliases])
        return name

    def get(self, name: str) -> type[T]:
        return self._classes[self.canonical(name)]

    def create(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._classes)

    def holds(self, cls: type) -> bool:
        """Is ``cls`` the class registered under its ``name``?"""
        name = getattr(cls, "name", "")
        return bool(name) and self._classes.get(name) is cls

    def aliases_of(self, name: str) -> list[str]:
        return sorted(a for a, n in self._aliases.items() if n == name)

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


@dataclass(frozen=True)
class MethodInfo:
    """What ``python -m defense list`` and the README's tables show of a registered method."""

    name: str
    summary: str
    paper: str
    year: int | None
    kind: str
    defaults: dict[str, Any]
    aliases: tuple[str, ...]
    source: str  # the method's file, relative to the project, or "plugin <distribution>"
    plugin: bool


def describe(registry: Registry[Any], name: str) -> MethodInfo:
    """The registered method ``name`` as the registry and its docstrings declare it."""
    name = registry.canonical(name)
    cls = registry.get(name)
    dist = getattr(cls, "_plugin_distribution", None)
    if dist is not None:
        source = f"plugin {dist} ({cls.__module__})"
    else:
        source = cls.__module__.replace(".", "/") + ".py"
    defaults = {k: ("required" if v is cfg.REQUIRED else v) for k, v in cls.defaults().items()}
    return MethodInfo(
        name,
        cls.summary(),
        cls.paper,
        cls.year,
        cls.kind,
        defaults,
        tuple(registry.aliases_of(name)),
        source,
        dist is not None,
    )


def load_plugins(registry: Registry[Any], group: str, base: type) -> list[str]:
    """Register the methods that installed distributions declare in entry-point ``group``
    (after the package's own modules). An entry point names a subclass of ``base``
    (registered under the entry point's name unless its module registers it) or a module
    whose import registers its classes. A plugin that fails to load is skipped with a
    warning that names it. Returns the names registered."""
    loaded = []
    for ep in importlib.metadata.entry_points(group=group):
        dist = ep.dist.name if ep.dist is not None else "an unknown distribution"
        before = set(registry.names())
        try:
            obj = ep.load()
            if isinstance(obj, type):
                if not issubclass(obj, base):
                    raise TypeError(f"{ep.value} is not a subclass of {base.__module__}.{base.__qualname__}")
                if not registry.holds(obj):
                    registry.register(ep.name)(obj)
        except Exception as exc:  # any failure of third-party code: skip it, say which
            warnings.warn(
                f"{registry.side} plugin '{ep.name}' ({ep.value}, from {dist}) was not loaded: "
                f"{type(exc).__name__}: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        for name in sorted(set(registry.names()) - before):
            registry.get(name)._plugin_distribution = dist
            loaded.append(name)
    return loaded
