"""Configuration: one declaration of a run's parameters drives the command line, the YAML
files and the Python API.

Precedence, lowest first (as in BackdoorBench): code defaults < ``--yaml_path`` (the
training recipe) < ``--bd_yaml_path`` (the method's parameters) < keyword arguments given
in Python < the command line. Every YAML key must name a known parameter and carry a
value of its type; otherwise the run stops with one line naming the key and the file.

A recipe file may also say where its values come from (:data:`RECIPE_KEYS`):
``recipe: reference`` (BackdoorBench's values for the dataset, or the paper's) or
``recipe: tuned`` (chosen by a study), ``recipe_source`` (the file or study they come
from) and ``recipe_note``. These are metadata: checked, never a run parameter, so they
stay out of a run's config and of the comparison's reuse check.
"""

from __future__ import annotations

import argparse
import inspect
import math
import re
import reprlib
import string
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
    ``X | None``, ``Literal[...]``, ``list[X]``), default, help text and checks.

    ``control``: the parameter says how or where a run is made, not what it computes
    (``--device``, ``--record_root``, ``--overwrite``): :func:`config_diff` skips it when a
    finished run (the comparison's reuse) or a checkpoint (``--resume``) is checked
    against a request. ``"apart"``: a control that is also kept out of the config a run
    saves (the harness hands it over apart: ``--resume``, ``--save_every``). The lists of
    such keys are derived from these marks (:func:`control_keys`, :func:`apart_keys`),
    never written out by hand.

    ``absent_is_default``: the parameter was added later and, at its default, only adds
    outputs (``--retune``): a result saved before it existed computed what its default
    computes, so :func:`config_diff` takes its absence from a stored config as the default."""

    name: str
    type: Any
    default: Any = REQUIRED
    help: str = ""
    aliases: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None  # returns a complaint or None
    control: bool | Literal["apart"] = False
    absent_is_default: bool = False

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def control_keys(params: Iterable[Param]) -> frozenset[str]:
    """The names of the parameters that say how a run is made, not what it computes
    (``control`` set): what :func:`config_diff` skips."""
    return frozenset(p.name for p in params if p.control)


def absent_defaults(params: Iterable[Param]) -> dict[str, Any]:
    """The defaults of the parameters marked ``absent_is_default``: what :func:`config_diff`
    takes a stored config without them to hold."""
    return {p.name: p.default for p in params if p.absent_is_default}


def apart_keys(params: Iterable[Param]) -> tuple[str, ...]:
    """The names of the controls kept out of a run's saved config (``control="apart"``)."""
    return tuple(p.name for p in params if p.control == "apart")


def config_diff(
    requested: Mapping[str, Any],
    stored: Mapping[str, Any],
    ignore: Iterable[str] = (),
    labels: tuple[str, str] = ("result", "requested"),
    defaults: Mapping[str, Any] | None = None,
) -> list[str]:
    """The differences between a requested resolved config and a stored one (a finished
    run's, a checkpoint's), as ``key: result X, requested Y`` texts (``labels`` name the
    two sides); keys in ``ignore`` (:func:`control_keys`) are skipped, floats equal to
    1e-9 relative are equal, and a key of ``defaults`` (:func:`absent_defaults`) that the
    stored config lacks is taken to hold its default there."""
    skip = set(ignore)
    missing = object()
    defaults = defaults or {}
    out = []
    for key in sorted((set(requested) | set(stored)) - skip):
        want, have = requested.get(key, missing), stored.get(key, missing)
        if have is missing and key in defaults:
            have = defaults[key]
        if isinstance(want, float) and isinstance(have, (int, float)) and not isinstance(have, bool):
            if math.isclose(want, float(have), rel_tol=1e-9, abs_tol=0.0):
                continue
        if want != have:
            out.append(
                f"{key}: {labels[0]} {'(absent)' if have is missing else brief(have)}, "
                f"{labels[1]} {'(absent)' if want is missing else brief(want)}"
            )
    return out


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


def params_from_signature(
    cls: type,
    aliases: Mapping[str, Iterable[str]] | None = None,
    checks: Mapping[str, Callable[[Any], str | None]] | None = None,
) -> list[Param]:
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
        params.append(
            Param(
                name,
                hints[name],
                default,
                helps.get(name, ""),
                tuple((aliases or {}).get(name, ())),
                (checks or {}).get(name),
            )
        )
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


def help_text(p: Param) -> str:
    """``p``'s help with its default once: "(required)", the help's own "(default: ...)"
    when it says one (a default computed at run time), else "(default: VALUE)"."""
    if p.required:
        return f"{p.help} (required)".strip()
    if "(default:" in p.help:
        return p.help
    return f"{p.help} (default: {p.default})".strip()


def build_parser(
    prog: str, params: Sequence[Param], description: str = "", epilog: str = ""
) -> argparse.ArgumentParser:
    # RawDescriptionHelpFormatter keeps the epilog's lines; the defaults are in help_text,
    # once (ArgumentDefaultsHelpFormatter would add a second "(default: None)").
    parser = _Parser(
        prog=prog,
        description=description,
        epilog=epilog or None,
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for p in params:
        flags = [f"--{p.name}", *(f"--{a}" for a in p.aliases)]
        base, _ = _split_optional(p.type)
        kwargs: dict[str, Any] = {"dest": p.name, "help": help_text(p)}
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


class _Refused(yaml.YAMLError):
    """YAML that parses but that a config file may not hold (aliases, duplicate keys)."""


class StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, minus what lets a small file mislead or blow up: anchors and
    aliases (``&a`` / ``*a``: a few hundred bytes of nested aliases expand to gigabytes)
    and duplicate keys (YAML says they are an error; PyYAML keeps the last silently)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(f"YAML aliases (*{clip(event.anchor, 40)}) are not allowed in config files")
        if getattr(event, "anchor", None) is not None:
            raise _Refused(f"YAML anchors (&{clip(event.anchor, 40)}) are not allowed in config files")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeConstructor refuses it itself
                continue
            if duplicate:
                raise _Refused(f"duplicate key {brief(key, 60)} (line {key_node.start_mark.line + 1})")
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str) -> Any:
    """``text`` read as YAML with :class:`StrictLoader`; bad YAML raises UserError with one
    line that starts with ``source`` (a file name, or ``--option KEY=VALUE``)."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader)
    except _Refused as exc:
        raise UserError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise UserError(f"{source}: not valid YAML{at}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # e.g. a date like 2021-13-45
        raise UserError(
            f"{source}: a value YAML cannot read ({type(exc).__name__}: "
            f"{clip(str(exc).splitlines()[0], 120) if str(exc) else 'no detail'})"
        ) from None


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from ``path`` (no aliases, no duplicate keys); an empty file is an
    empty mapping."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read config file {path}: {exc}") from None
    data = load_yaml(text, str(path))
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


class _Brief(reprlib.Repr):
    """reprlib with limits on depth, breadth and every string and number, so that a
    message never walks more than a bounded part of a value (a YAML structure, a huge
    integer)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxtuple = self.maxlist = self.maxarray = self.maxdict = self.maxset = self.maxfrozenset = (
            self.maxdeque
        ) = 6
        # twice the limit: brief() cuts the end itself, so a long string reads from its start
        self.maxstring = self.maxother = self.maxlong = min(2 * limit + 10, 1000)

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 4 * self.maxlong:  # also beyond what str() of an int may convert
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)

    def repr_instance(self, x: Any, level: int) -> str:
        try:
            return super().repr_instance(x, level)
        except Exception:  # a value whose repr fails: its type is enough
            return f"<{type(x).__name__}>"


def brief(value: Any, limit: int = 80) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters (for error messages); a
    nested or long value is abbreviated (reprlib-style), never walked in full."""
    text = " ".join(_Brief(limit).repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: Any, limit: int = 80) -> str:
    """``str(text)`` on one line, cut to ``limit`` characters (for names and paths in
    messages, shown without quotes)."""
    text = str(text)[: limit * 4]
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# The largest magnitude a float parameter may have: float32's (torch's default dtype), so
# that no value overflows when torch turns it into a tensor or a step size.
FLOAT_LIMIT = float(3.4028234663852886e38)


def _out_of_range(value: Any) -> bool:
    """Is ``value`` (a float, or a list of them) beyond float32's range?"""
    if isinstance(value, float):
        return abs(value) > FLOAT_LIMIT
    if isinstance(value, list):
        return any(_out_of_range(v) for v in value)
    return False


def _checked(param: Param, value: Any, source: str) -> Any:
    try:
        value = coerce(value, param.type)
    except TypeError:
        raise UserError(f"{source}: '{param.name}' must be {type_name(param.type)}, got {brief(value)}") from None
    if _out_of_range(value):
        raise UserError(
            f"{source}: '{param.name}' must be within float32's range (at most {FLOAT_LIMIT:.4g} in "
            f"magnitude), got {brief(value)}"
        )
    complaint = param.check(value) if param.check else None
    if complaint:
        raise UserError(f"{source}: '{param.name}' {complaint}, got {brief(value)}")
    return value


RECIPE_KEYS = frozenset({"recipe", "recipe_source", "recipe_note"})
RECIPE_FAMILIES = ("reference", "tuned")


def recipe_of(data: Mapping[str, Any], source: str) -> dict[str, str]:
    """The recipe metadata of a YAML mapping (``recipe``, ``recipe_source``,
    ``recipe_note``; absent keys left out), checked."""
    out: dict[str, str] = {}
    for key in sorted(RECIPE_KEYS & {k for k in data if isinstance(k, str)}):
        value = data[key]
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{source}: '{key}' must be a non-empty string, got {brief(value)}")
        out[key] = value
    if "recipe" in out and out["recipe"] not in RECIPE_FAMILIES:
        raise UserError(f"{source}: 'recipe' must be one of {', '.join(RECIPE_FAMILIES)}, got {brief(out['recipe'])}")
    return out


def resolve(params: Sequence[Param], layers: Sequence[Layer], cli: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Merge ``layers`` (lowest precedence first) over the defaults, then ``cli`` on top.
    Unknown keys, wrong types, failed checks and missing required values raise UserError."""
    by_name: dict[str, Param] = {}
    for p in params:
        for key in (p.name, *p.aliases):
            by_name[key] = p
    values: dict[str, Any] = {p.name: p.default for p in params}
    for layer in layers:
        recipe_of(layer.values, layer.source)  # metadata: checked, not a parameter
        for key, value in layer.values.items():
            if key in layer.ignore or key in RECIPE_KEYS:
                continue
            if not isinstance(key, str) or key not in by_name:
                raise UserError(f"{layer.source}: unknown key '{clip(key, 60)}'" + _suggest(clip(key, 60), by_name))
            param = by_name[key]
            values[param.name] = _checked(param, value, layer.source)
    for key, value in (cli or {}).items():
        param = by_name[key]
        values[param.name] = _checked(param, value, "command line")
    missing = [p.name for p in params if values[p.name] is REQUIRED]
    if missing:
        raise UserError("missing required argument(s): " + ", ".join(f"--{m}" for m in missing))
    return values


def resolved_text(title: str, params: Sequence[Param], layers: Sequence[Layer]) -> str:
    """The lines of ``python -m <side> show``: ``title``, the files in ``layers`` (each
    with its recipe line: reference or tuned, source, note), then one ``name = value``
    line per parameter, with ``(code default X)`` where a file changed it; the controls
    (how a run is made: device, folders) only where a file sets them."""
    values = resolve(params, layers)
    lines = [title + ":"]
    files = [layer for layer in layers if layer.source.endswith((".yaml", ".yml"))]
    if not files:
        lines.append("  no YAML file: the code's defaults")
    for i, layer in enumerate(files):
        recipe = recipe_of(layer.values, layer.source)
        over = i + 1 < len(files) and Path(files[i + 1].source).parent == Path(layer.source).parent
        if over and Path(layer.source).name == DEFAULT_YAML:  # a dataset's file follows and says its recipe
            lines.append(f"  reads {layer.source}, then the dataset's file over it:")
            continue
        line = f"  reads {layer.source}"
        if recipe:
            line += f"  (recipe: {recipe.get('recipe', 'unstated')}"
            line += f"; source: {recipe['recipe_source']}" if "recipe_source" in recipe else ""
            line += f"; {recipe['recipe_note']}" if "recipe_note" in recipe else ""
            line += ")"
        lines.append(line)
    shown_params = [p for p in params if not p.control or values[p.name] != p.default]
    width = max((len(p.name) for p in shown_params), default=0)
    for p in shown_params:
        value = values[p.name]
        note = "" if value == p.default else f"   (code default {p.default!r})"
        lines.append(f"  {p.name.ljust(width)} = {value!r}{note}")
    return "\n".join(lines)


def check_early(
    params: Sequence[Param], values: Mapping[str, Any], names: Iterable[str], source: str = "keyword arguments"
) -> None:
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


def refuse_user_only(layers: Sequence[Layer], keys: Iterable[str] = USER_ONLY_KEYS, what: str = "a YAML file") -> None:
    """One line when a file layer (any layer but the keyword arguments) sets one of
    ``keys`` (default :data:`USER_ONLY_KEYS`)."""
    for layer in layers:
        if layer.source == "keyword arguments":
            continue
        for key in keys:
            if key in layer.values:
                raise UserError(
                    f"{layer.source}: '{key}' can be given only on the command line (or as a keyword "
                    f"argument), not in {what}"
                )


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


def fill_template(template: str, fields: Mapping[str, Any]) -> str:
    """``template`` with each ``{name}`` replaced by ``fields[name]``: plain field names
    only (no attributes, indices, conversions or format specs, which would let a file
    reach into objects or ask for gigabytes of padding). Raises ValueError saying what
    is wrong."""
    out = []
    for literal, name, spec, conversion in string.Formatter().parse(template):  # ValueError on '{' alone
        out.append(literal)
        if name is None:
            continue
        if name not in fields or conversion is not None or spec:
            shown = "{" + name + ("!" + conversion if conversion else "") + (":" + spec if spec else "") + "}"
            raise ValueError(
                f"{clip(shown, 40)} is not one of the plain fields " + ", ".join("{" + k + "}" for k in fields)
            )
        out.append(str(fields[name]))
    return "".join(out)


# -- where the shipped YAML files live ------------------------------------------------------------

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


DEFAULT_YAML = "default.yaml"


def _plain_name(dataset: str) -> bool:
    """A dataset name that may name a file (it may come from a record): no folders, no dot first."""
    return bool(dataset) and Path(dataset).name == dataset and not dataset.startswith(".")


def method_yaml(side: str, name: str, dataset: str) -> Path | None:
    """``config/<side>/<name>/<dataset>.yaml`` (``side``: attack or defense), else ``.../default.yaml``, else None. A
    ``dataset`` that is not a plain name (it may come from a record) is not looked up.
    The file found is read with :func:`yaml_layers` (a dataset's file over the default)."""
    mine = [CONFIG_DIR / side / name / f"{dataset}.yaml"] if _plain_name(dataset) else []
    for candidate in (*mine, CONFIG_DIR / side / name / DEFAULT_YAML):
        if candidate.is_file():
            return candidate
    return None


TUNED_SUFFIX = "_tuned"


def tuned_yaml(side: str, name: str, dataset: str) -> Path | None:
    """The shipped tuned recipe ``config/<side>/<name>/<dataset>_tuned.yaml`` (written by
    scripts/ship_tuned.py from a study, which it names; read over default.yaml like a
    dataset's file), or None when there is none or ``dataset`` is not a plain name."""
    path = CONFIG_DIR / side / name / f"{dataset}{TUNED_SUFFIX}.yaml"
    return path if _plain_name(dataset) and path.is_file() else None


def yaml_layers(path: Path | str, ignore: Iterable[str] = frozenset()) -> list[Layer]:
    """The layers a config file stands for, lowest first. A file beside a ``default.yaml``
    (a method's file for one dataset, ``config/<side>/<name>/<dataset>.yaml``, or any
    file a user puts there) holds only what differs from that default and is read over it;
    ``default.yaml`` itself, and a file elsewhere, is read alone. Each layer keeps its own
    recipe metadata (:func:`recipe_of`): a dataset's file says its own recipe."""
    path = Path(path)
    ignore = frozenset(ignore)
    base = path.parent / DEFAULT_YAML
    layers = []
    if path.name != DEFAULT_YAML and base.is_file() and base.resolve() != path.resolve():
        layers.append(Layer(shown(base), read_yaml(base), ignore))
    layers.append(Layer(shown(path), read_yaml(path), ignore))
    return layers


def shown(path: Path | str) -> str:
    """A config path as the user should see it (relative to the project when inside it)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(CONFIG_DIR.parent))
    except ValueError:
        return str(path)
