"""Configuration: one declaration of a run's parameters drives the command line, the YAML
files and the Python API.

Precedence, lowest first (as in BackdoorBench): code defaults < ``--yaml_path`` (the
training recipe) < ``--bd_yaml_path`` (the method's parameters) < keyword arguments given
in Python < the command line. Every YAML key must name a known parameter and carry a
value of its type; otherwise the run stops with one line naming the key and the file.
"""
from __future__ import annotations

import argparse
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import yaml

from utils.errors import UserError

REQUIRED = object()  # default of a parameter that must be given


@dataclass(frozen=True)
class Param:
    """One run parameter: its name, type (a plain annotation: int, float, str, bool,
    ``X | None``, ``Literal[...]``, ``list[X]``), default, help text and checks."""

    name: str
    type: Any
    default: Any = REQUIRED
    help: str = ""
    aliases: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None  # returns a complaint or None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


# -- value checks ------------------------------------------------------------------

def positive(value: Any) -> str | None:
    return None if value is None or value > 0 else "must be > 0"


def non_negative(value: Any) -> str | None:
    return None if value is None or value >= 0 else "must be >= 0"


def fraction(value: Any) -> str | None:
    return None if value is None or 0 < value <= 1 else "must be in (0, 1]"


def unit_interval(value: Any) -> str | None:
    return None if value is None or 0 <= value <= 1 else "must be in [0, 1]"


MAX_SEED = 2**32 - 1


def seed(value: Any) -> str | None:
    """A random seed: what Python, NumPy and torch all accept."""
    return None if value is None or 0 <= value <= MAX_SEED else f"must be in 0..{MAX_SEED}"


# -- types ----------------------------------------------------------------------------

def _split_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def type_name(tp: Any) -> str:
    base, optional = _split_optional(tp)
    if typing.get_origin(base) is Literal:
        name = "one of " + ", ".join(repr(a) for a in typing.get_args(base))
    elif typing.get_origin(base) in (list, tuple):
        inner = typing.get_args(base)[0] if typing.get_args(base) else Any
        name = f"a list of {getattr(inner, '__name__', str(inner))}"
    elif base is float:
        name = "a finite float"
    else:
        name = getattr(base, "__name__", str(base))
    return name + (" or null" if optional else "")


def coerce(value: Any, tp: Any) -> Any:
    """Check ``value`` (from YAML or Python) against ``tp``; return it in canonical form
    (ints accepted for floats). Raises TypeError with no message on mismatch."""
    base, optional = _split_optional(tp)
    if value is None:
        if optional:
            return None
        raise TypeError
    if typing.get_origin(base) is Literal:
        if value in typing.get_args(base):
            return value
        raise TypeError
    if typing.get_origin(base) in (list, tuple):
        inner = typing.get_args(base)[0] if typing.get_args(base) else Any
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return [coerce(v, inner) for v in value]
    if base is Any:
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int too large for a float
                raise TypeError from None
            if math.isfinite(number):
                return number
        raise TypeError
    if base is str:
        if isinstance(value, str):
            return value
        raise TypeError
    raise TypeError


# -- parameters from a constructor -----------------------------------------------------------

_ARG_LINE = re.compile(r"^\s+(\w+)(?:\s*\([^)]*\))?:\s+(.*\S)\s*$")


def docstring_help(doc: str | None) -> dict[str, str]:
    """Help texts from an ``Args:``/``Hyperparameters:`` section of a docstring
    (lines ``    name: text``)."""
    out: dict[str, str] = {}
    in_section = False
    for line in inspect.cleandoc(doc or "").splitlines():
        if re.match(r"^(Args|Arguments|Hyperparameters|Parameters):\s*$", line.strip()):
            in_section = True
            continue
        if in_section:
            if line and not line.startswith(" "):
                in_section = False
                continue
            match = _ARG_LINE.match(line)
            if match:
                out[match.group(1)] = match.group(2)
    return out


def params_from_signature(cls: type, aliases: Mapping[str, Iterable[str]] | None = None,
                          checks: Mapping[str, Callable[[Any], str | None]] | None = None) -> list[Param]:
    """The keyword parameters of ``cls.__init__`` (with annotations and defaults) as
    Params; help texts come from the class docstring."""
    hints = typing.get_type_hints(cls.__init__)
    helps = docstring_help(cls.__doc__)
    params = []
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name not in hints:
            raise TypeError(f"{cls.__name__}.__init__: parameter '{name}' needs a type annotation")
        default = REQUIRED if p.default is p.empty else p.default
        params.append(Param(name, hints[name], default, helps.get(name, ""),
                            tuple((aliases or {}).get(name, ())), (checks or {}).get(name)))
    return params


def hyperparameters_of(obj: Any) -> dict[str, Any]:
    """The constructor arguments of ``obj``, read back from its attributes of the same names."""
    return {p.name: getattr(obj, p.name) for p in params_from_signature(type(obj))}


# -- the parser -----------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError instead of printing usage and exiting."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def _cli_converter(tp: Any) -> Callable[[str], Any]:
    base, optional = _split_optional(tp)

    def convert(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        return text

    convert.__name__ = getattr(base, "__name__", None) or type_name(base)
    return convert


def build_parser(prog: str, params: Sequence[Param], description: str = "") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description, argument_default=argparse.SUPPRESS,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for p in params:
        flags = [f"--{p.name}", *(f"--{a}" for a in p.aliases)]
        base, _ = _split_optional(p.type)
        shown = "required" if p.required else p.default
        kwargs: dict[str, Any] = {"dest": p.name, "help": f"{p.help} (default: {shown})".strip()}
        if base is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(base) is Literal:
            parser.add_argument(*flags, choices=typing.get_args(base), **kwargs)
        elif typing.get_origin(base) in (list, tuple):
            inner = typing.get_args(base)[0] if typing.get_args(base) else str
            parser.add_argument(*flags, nargs="+", type=_cli_converter(inner), **kwargs)
        else:
            parser.add_argument(*flags, type=_cli_converter(p.type), **kwargs)
    return parser


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; an empty file is an empty mapping."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read config file {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise UserError(f"{path}: not valid YAML{at}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # e.g. a date like 2021-13-45
        raise UserError(f"{path}: a value YAML cannot read ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120] if str(exc) else 'no detail'})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of parameter names to values")
    return data


@dataclass
class Layer:
    """One source of values, for precedence and error messages."""

    source: str  # e.g. "config/attack/badnet/default.yaml", "keyword arguments"
    values: Mapping[str, Any]
    ignore: frozenset[str] = field(default_factory=frozenset)  # keys allowed but not used


def brief(value: Any, limit: int = 80) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters (for error messages)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _checked(param: Param, value: Any, source: str) -> Any:
    try:
        value = coerce(value, param.type)
    except TypeError:
        raise UserError(f"{source}: '{param.name}' must be {type_name(param.type)}, got {brief(value)}") from None
    complaint = param.check(value) if param.check else None
    if complaint:
        raise UserError(f"{source}: '{param.name}' {complaint}, got {brief(value)}")
    return value


def resolve(params: Sequence[Param], layers: Sequence[Layer], cli: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Merge ``layers`` (lowest precedence first) over the defaults, then ``cli`` on top.
    Unknown keys, wrong types, failed checks and missing required values raise UserError."""
    by_name: dict[str, Param] = {}
    for p in params:
        for key in (p.name, *p.aliases):
            by_name[key] = p
    values: dict[str, Any] = {p.name: p.default for p in params}
    for layer in layers:
        for key, value in layer.values.items():
            if key in layer.ignore:
                continue
            if not isinstance(key, str) or key not in by_name:
                raise UserError(f"{layer.source}: unknown key '{key}'" + _suggest(str(key), by_name))
            param = by_name[key]
            values[param.name] = _checked(param, value, layer.source)
    for key, value in (cli or {}).items():
        param = by_name[key]
        values[param.name] = _checked(param, value, "command line")
    missing = [p.name for p in params if values[p.name] is REQUIRED]
    if missing:
        raise UserError("missing required argument(s): " + ", ".join(f"--{m}" for m in missing))
    return values


def check_early(params: Sequence[Param], values: Mapping[str, Any], names: Iterable[str],
                source: str = "keyword arguments") -> None:
    """Check the values of ``names`` that are used before the layers are resolved (the
    files to read, the dataset or record they depend on)."""
    by_name = {p.name: p for p in params}
    for name in names:
        if name in values:
            _checked(by_name[name], values[name], source)


def given(name: str, layers: Sequence[Layer], cli: Mapping[str, Any] | None = None) -> bool:
    """Was ``name`` set explicitly (in a layer or on the command line), not by its default?"""
    return name in (cli or {}) or any(name in layer.values and name not in layer.ignore for layer in layers)


# Where a run reads and writes, and whether it may unpickle: the user's choice (command line
# or keyword arguments), never a file's (a YAML or grid file may come from someone else).
USER_ONLY_KEYS = ("data_root", "record_root", "trust_record")


def refuse_user_only(layers: Sequence[Layer], keys: Iterable[str] = USER_ONLY_KEYS,
                     what: str = "a YAML file") -> None:
    """One line when a file layer (any layer but the keyword arguments) sets one of
    ``keys`` (default :data:`USER_ONLY_KEYS`)."""
    for layer in layers:
        if layer.source == "keyword arguments":
            continue
        for key in keys:
            if key in layer.values:
                raise UserError(f"{layer.source}: '{key}' can be given only on the command line (or as a keyword "
                                f"argument), not in {what}")


def _suggest(key: str, known: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def parse_cli(parser: argparse.ArgumentParser, argv: Sequence[str]) -> dict[str, Any]:
    """The arguments given on the command line, and only those."""
    return vars(parser.parse_args(list(argv)))


def plain(value: Any) -> Any:
    """``value`` made of plain types only (for records that load with weights_only)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# -- where the shipped YAML files live ------------------------------------------------------------

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


def method_yaml(kind: str, name: str, dataset: str) -> Path | None:
    """``config/<kind>/<name>/<dataset>.yaml``, else ``.../default.yaml``, else None. A
    ``dataset`` that is not a plain name (it may come from a record) is not looked up."""
    plain_name = bool(dataset) and Path(dataset).name == dataset and not dataset.startswith(".")
    mine = [CONFIG_DIR / kind / name / f"{dataset}.yaml"] if plain_name else []
    for candidate in (*mine, CONFIG_DIR / kind / name / "default.yaml"):
        if candidate.is_file():
            return candidate
    return None


def shown(path: Path | str) -> str:
    """A config path as the user should see it (relative to the project when inside it)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(CONFIG_DIR.parent))
    except ValueError:
        return str(path)
