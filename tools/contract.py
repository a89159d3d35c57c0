"""The method contract: the rules every registered attack and defense keeps, each checked
by a function that takes a class and raises :class:`ContractError` naming the rule it
breaks and how to fix it.

The rules (ids as the messages give them; the side's module adds the checks that need its
harness, see ``defense/contract.py`` and ``attack/contract.py``):

    registered         a subclass of the side's base class, registered under its name
    documented         the module docstring cites the paper (with its year); the class has a
                       one-line summary and a ``paper`` attribute
    year-and-kind      ``year`` (the paper's) and ``kind`` (one of the side's kinds)
    hyperparameters    annotated keyword arguments of ``__init__`` with defaults, each
                       stored unchanged as an attribute of the same name
    config             ships config/<side>/<name>/default.yaml (or digits.yaml)
    no-record-loading  loads no record and no dataset itself
    no-evaluation      evaluates nothing itself (utils.metrics.evaluate)
    no-argv            parses no argv (argparse)
    no-printing        writes nothing to stdout
    returns-the-model  (defenses) mitigate returns the model it was given
    record-untouched   (defenses) the attack record is left as it was
    deterministic      the same seed gives identical numbers

"Loads", "evaluates" and "parses" are checked by running the method with those functions
replaced, for the duration of its own code only (:meth:`Contract.guard`), by ones that
fail with the rule's message unless the harness itself calls them.

tools/ never imports attack/ or defense/: each side builds a :class:`Contract` from its
base class, registry and harness module.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import inspect
import io
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NoReturn

from utils import config as cfg
from utils.registry import Registry

RULES: dict[str, tuple[str, str]] = {  # rule: (what it asks, how to fix a break)
    "registered": ("register the class under its name", 'decorate a subclass of {base} with @{decorator}("<name>")'),
    "documented": (
        "document the paper in the docstrings",
        "give the module a docstring that cites the paper (authors, title, venue, year), states the idea, "
        "the hyperparameters with their defaults and any deviation; give the class a docstring whose first "
        "line says what the method does; set the class attribute `paper` to the citation",
    ),
    "year-and-kind": (
        "declare the paper's year and the method's kind",
        "set the class attributes `year` (an int, the paper's year) and `kind` (one of: {kinds})",
    ),
    "hyperparameters": (
        "keep the hyperparameters in the constructor, with defaults",
        "take every hyperparameter as an annotated keyword argument of __init__ with the paper's "
        "default, store it unchanged as an attribute of the same name, and name only hyperparameters "
        "in smoke_params",
    ),
    "config": (
        "ship a config for the offline default",
        "add config/{side}/<name>/default.yaml (or digits.yaml) with the hyperparameters and their defaults",
    ),
    "no-record-loading": (
        "load no record and no dataset itself",
        "use what the harness passes in ({context}); the harness loads the record and the data",
    ),
    "no-evaluation": (
        "evaluate nothing itself",
        "leave evaluation to the harness ({evaluation}); it evaluates on test data the method never sees",
    ),
    "no-argv": (
        "parse no argv",
        "take settings as constructor arguments; the harness builds the command line and the YAML lookup "
        "from the constructor's signature",
    ),
    "no-printing": ("print nothing", "log with logging.getLogger('saubench') (and tqdm for progress bars)"),
    "returns-the-model": (
        "return the model it was given",
        "return the purified model from mitigate: the Classifier it received (or one of the same architecture)",
    ),
    "record-untouched": (
        "leave the attack record alone",
        "write nothing yourself; the harness writes the results under record/<name>/defense/",
    ),
    "deterministic": (
        "give identical numbers for the same seed",
        "draw every random number from generators seeded by the harness ({seeding}); no time, "
        "os.urandom or unseeded generators, no state kept between runs",
    ),
}


class ContractError(AssertionError):
    """A broken contract rule; ``rule`` is its id (a key of :data:`RULES`)."""

    def __init__(self, message: str, rule: str):
        super().__init__(message)
        self.rule = rule


@dataclass
class Guard:
    """While open (:meth:`window`, reentrant), the functions behind the rules
    no-record-loading, no-evaluation and no-argv fail with their rule's message unless
    the harness (a module in ``allowed``) makes the call, and stdout is captured
    (no-printing). Violations are kept, so that a method that swallows the error is still
    caught: :meth:`raise_first` after the run."""

    contract: "Contract"
    cls: type
    allowed: frozenset[str]
    violations: list[ContractError] = field(default_factory=list)
    _depth: int = 0
    _undo: list[Callable[[], None]] = field(default_factory=list)

    def fail(self, rule: str, detail: str) -> ContractError:
        error = self.contract.error(self.cls, rule, detail)
        self.violations.append(error)
        return error

    def raise_first(self) -> None:
        if self.violations:
            raise self.violations[0]

    @contextlib.contextmanager
    def window(self, where: str) -> Iterator[None]:
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._depth = 1
        out = io.StringIO()
        self._install(where)
        try:
            with contextlib.redirect_stdout(out):
                yield
        finally:
            self._depth = 0
            while self._undo:
                self._undo.pop()()
            printed = out.getvalue().strip()
            if printed:
                self.fail("no-printing", f"{where} printed {printed.splitlines()[0][:80]!r}")

    def _install(self, where: str) -> None:
        from utils import datasets, metrics, records  # the functions the rules forbid

        for rule, module, name in (
            ("no-record-loading", records, "load_record"),
            ("no-record-loading", datasets, "load_dataset"),
            ("no-evaluation", metrics, "evaluate"),
        ):
            original = getattr(module, name)
            replacement = self._forbidden(rule, f"{module.__name__}.{name}", where, original)
            for holder in list(sys.modules.values()):  # every `from utils.x import name` binding
                namespace = getattr(holder, "__dict__", None)
                if not isinstance(namespace, dict):
                    continue
                for key in [k for k, v in list(namespace.items()) if v is original]:
                    try:
                        setattr(holder, key, replacement)
                    except (AttributeError, TypeError):  # a read-only namespace: nothing there to guard
                        continue
                    self._undo.append(functools.partial(setattr, holder, key, original))
        for name in ("parse_args", "parse_known_args"):
            original = vars(argparse.ArgumentParser)[name]
            setattr(
                argparse.ArgumentParser,
                name,
                self._forbidden("no-argv", f"argparse.ArgumentParser.{name}", where, original),
            )
            self._undo.append(functools.partial(setattr, argparse.ArgumentParser, name, original))

    def _forbidden(self, rule: str, what: str, where: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def forbidden(*args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1)
            # Allowed when the harness makes the call for the method (data.report evaluates,
            # ctx.clean_model loads a record): a harness frame between the call and the
            # window's entry (this module's frames).
            frame = caller
            while frame is not None and frame.f_globals.get("__name__") != __name__:
                if frame.f_globals.get("__name__") in self.allowed:
                    return original(*args, **kwargs)
                frame = frame.f_back
            module = caller.f_globals.get("__name__", "?")
            raise self.fail(rule, f"{module}.{caller.f_code.co_name} called {what} (in {where})")

        return forbidden


@dataclass(frozen=True)
class Contract:
    """The rules as they apply to one side (attacks or defenses)."""

    side: str  # "attack" or "defense"
    base: type
    registry: Registry[Any]
    decorator: str  # e.g. "register_defense"
    harness: str  # the harness module: the only caller allowed to load and evaluate
    kinds: tuple[str, ...]
    yearless_kinds: tuple[str, ...] = ()  # kinds without a paper (clean training)
    hints: dict[str, str] = field(default_factory=dict)  # {context}, {evaluation}, {seeding} in RULES

    # -- messages --------------------------------------------------------------------------------

    def label(self, cls: type) -> str:
        if self.registry.holds(cls):
            return f"{self.side} '{cls.name}'"
        return f"{self.side} class {cls.__module__}.{cls.__qualname__}"

    def error(self, cls: type, rule: str, detail: str) -> ContractError:
        what, fix = RULES[rule]
        fix = fix.format(
            base=f"{self.base.__module__}.{self.base.__qualname__}",
            decorator=self.decorator,
            kinds=", ".join(self.kinds),
            side=self.side,
            **self.hints,
        )
        return ContractError(
            f"{self.label(cls)} breaks the contract rule '{rule}' ({what}): {detail}. How to fix: {fix}.", rule
        )

    def fail(self, cls: type, rule: str, detail: str) -> NoReturn:
        raise self.error(cls, rule, detail)

    def guard(self, cls: type) -> Guard:
        return Guard(self, cls, frozenset({self.harness}))

    # -- rules that read the class -----------------------------------------------------------------

    def check_registered(self, cls: type) -> None:
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            self.fail(cls, "registered", f"it is not a subclass of {self.base.__qualname__}")
        if not self.registry.holds(cls):
            self.fail(cls, "registered", f"no {self.side} is registered as this class")

    def check_documented(self, cls: type) -> None:
        if not isinstance(cls.paper, str) or not cls.paper.strip():
            self.fail(cls, "documented", "the class attribute `paper` is empty")
        if not cls.summary():
            self.fail(cls, "documented", "the class has no docstring (its first line is the method's summary)")
        module_doc = (inspect.getmodule(cls).__doc__ or "").strip()
        if len(module_doc) < 80:
            self.fail(
                cls,
                "documented",
                f"the module docstring has {len(module_doc)} characters: too short to cite "
                "the paper and state the idea and the defaults",
            )
        if isinstance(cls.year, int) and str(cls.year) not in module_doc:
            self.fail(cls, "documented", f"the module docstring does not cite the paper's year {cls.year}")

    def check_year_and_kind(self, cls: type) -> None:
        if cls.kind not in self.kinds:
            self.fail(cls, "year-and-kind", f"kind is {cls.kind!r}")
        if cls.kind in self.yearless_kinds:
            return
        year = cls.year
        if not isinstance(year, int) or isinstance(year, bool) or not 1980 <= year <= datetime.date.today().year + 1:
            self.fail(cls, "year-and-kind", f"year is {year!r}")

    def check_hyperparameters(self, cls: type) -> None:
        try:
            params = cls.params()
        except TypeError as exc:  # an __init__ argument without annotation
            self.fail(cls, "hyperparameters", str(exc))
        missing = [p.name for p in params if p.default is cfg.REQUIRED]
        if missing:
            self.fail(
                cls, "hyperparameters", f"{', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no default"
            )
        unknown = sorted(set(cls.smoke_params) - {p.name for p in params})
        if unknown:
            self.fail(cls, "hyperparameters", f"smoke_params names {', '.join(unknown)}, not a hyperparameter")
        guard = self.guard(cls)
        try:
            with guard.window(f"{cls.__qualname__}.__init__"):
                instance = cls()
        except ContractError:
            raise
        except Exception as exc:
            self.fail(
                cls, "hyperparameters", f"{cls.__qualname__}() with the defaults raised {type(exc).__name__}: {exc}"
            )
        guard.raise_first()
        try:
            stored = instance.hyperparameters()
        except AttributeError as exc:
            self.fail(cls, "hyperparameters", f"a constructor argument is not kept as an attribute ({exc})")
        # plain(): a tuple default may be kept as a list
        changed = [p.name for p in params if cfg.plain(stored[p.name]) != cfg.plain(p.default)]
        if changed:
            self.fail(cls, "hyperparameters", f"the attributes {', '.join(changed)} differ from the arguments given")

    def check_config(self, cls: type) -> None:
        if getattr(cls, "_plugin_distribution", None) is not None:
            return  # a plugin ships no config in this project; its defaults are its constructor's
        if cfg.method_yaml(self.side, cls.name, "digits") is None:
            self.fail(cls, "config", f"found neither config/{self.side}/{cls.name}/digits.yaml nor default.yaml")

    def static_checks(self) -> dict[str, Callable[[type], None]]:
        """The rules that read the class, by id (no run needed)."""
        return {
            "registered": self.check_registered,
            "documented": self.check_documented,
            "year-and-kind": self.check_year_and_kind,
            "hyperparameters": self.check_hyperparameters,
            "config": self.check_config,
        }

    def check_static(self, cls: type, *, config: bool = True) -> None:
        for rule, check in self.static_checks().items():
            if config or rule != "config":
                check(cls)

    # -- helpers for the rules that run the method ---------------------------------------------------

    @contextlib.contextmanager
    def registered(self, cls: type) -> Iterator[str]:
        """The name the harness runs ``cls`` under: its own, or a temporary one for a class
        that is not registered (a throwaway class in a test)."""
        if self.registry.holds(cls):
            yield cls.name
            return
        own = vars(cls).get("name")
        temporary = f"contract_{cls.__name__.lower()}"
        self.registry.register(temporary)(cls)
        try:
            yield temporary
        finally:
            self.registry.unregister(temporary)
            if own is None:
                delattr(cls, "name")
            else:
                cls.name = own

    @contextlib.contextmanager
    def guarded_methods(
        self, cls: type, names: tuple[str, ...], after: Callable[[Guard, str, tuple, Any], Any] | None = None
    ) -> Iterator[Guard]:
        """Replace ``cls``'s methods ``names`` (those it defines or inherits from below the
        base class) by ones that run inside the guard's window; ``after(guard, name, args,
        result)`` may check each result and returns what the caller gets. Restored on exit."""
        guard = self.guard(cls)
        saved = {}
        for name in names:
            inner = getattr(cls, name)
            if inner is getattr(self.base, name, None):
                continue  # the base class's default: nothing of the method's own to guard
            saved[name] = vars(cls).get(name)
            setattr(cls, name, in_window(guard, inner, f"{cls.__qualname__}.{name}", name, after))
        try:
            yield guard
        finally:
            for name, original in saved.items():
                if original is None:
                    delattr(cls, name)
                else:
                    setattr(cls, name, original)


def in_window(
    guard: Guard,
    inner: Callable[..., Any],
    where: str,
    name: str = "",
    after: Callable[[Guard, str, tuple, Any], Any] | None = None,
) -> Callable[..., Any]:
    """``inner`` run inside ``guard``'s window (``where`` names it in messages)."""

    @functools.wraps(inner)
    def method(*args: Any, **kwargs: Any) -> Any:
        with guard.window(where):
            result = inner(*args, **kwargs)
        return result if after is None else after(guard, name, args, result)

    return method
