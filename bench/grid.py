"""What a comparison compares: the records (made by an attack, or existing), the defenses
with their options, and the seeds, read from a grid file (config/grid/*.yaml) or from the
command line's --result_file, --defenses and --option; every name and option is checked
against its registry before anything runs. See bench/compare.py for the grid file's keys.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from utils import cluster, config as cfg
from utils.errors import UserError

GRID_KEYS = {
    "name",
    "datasets",
    "models",
    "record_name",
    "attack_options",
    "attacks",
    "defense_options",
    "defenses",
    "seeds",
    "record_seeds",
    "purpose",
    "resources",
}


@dataclass
class RecordSpec:
    record_name: str
    attack: str | None = None  # None: an existing record (--result_file)
    options: dict[str, Any] = field(default_factory=dict)  # attack harness keywords
    seed: int | None = None  # the grid's seed this record was made with (``record_seeds``): only its defense runs
    column: str = ""  # the table column (the record name without its seed suffix) when ``seed`` is set


@dataclass
class Spec:
    name: str
    records: list[RecordSpec]
    defenses: dict[str, dict[str, Any]]  # canonical name -> defense harness keywords
    seeds: list[int]
    purpose: str | None = None  # the grid's 'purpose:' (e.g. "smoke test: numbers are not results")
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> cpus/gpus/memory (Ray)


def _default_name(records: Sequence[str]) -> str:
    name = "+".join(r.replace("/", "-") for r in records)
    if len(name) > 80:
        name = name[:60] + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return name


def _parse_options(items: Sequence[str] | None, defenses: Sequence[str]) -> dict[str, dict[str, Any]]:
    """--option KEY=VALUE (every defense) and DEFENSE.KEY=VALUE, values read as YAML."""
    from defense import DEFENSES

    out: dict[str, dict[str, Any]] = {d: {} for d in defenses}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"--option {cfg.brief(item)}: expected KEY=VALUE or DEFENSE.KEY=VALUE")
        try:
            value = cfg.load_yaml(text, "--option")
        except UserError as exc:
            raise UserError(
                f"--option {cfg.brief(item)}: the value is not valid YAML ({str(exc).removeprefix('--option: ')})"
            ) from None
        target, dot, name = key.rpartition(".")
        if not dot:
            for d in out:
                out[d][key] = value
            continue
        canonical = DEFENSES.canonical(target)
        if canonical not in out:
            raise UserError(
                f"--option {cfg.brief(item)}: defense {canonical} is not among the compared ones ({', '.join(out)})"
            )
        out[canonical][name] = value
    return out


def _defense_names(names: Sequence[str] | None, where: str) -> list[str]:
    from defense import DEFENSES

    if names is None:  # the detectors and the training-time defenses (they retrain the model) are compared when named
        return [n for n in DEFENSES.names() if DEFENSES.get(n).kind == "mitigation"]
    out: list[str] = []
    for name in names:
        try:
            canonical = DEFENSES.canonical(name)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        if canonical not in out:
            out.append(canonical)
    return out


def spec_from_records(values: dict[str, Any]) -> Spec:
    records = list(dict.fromkeys(values["result_file"]))
    defenses = _defense_names(values["defenses"], "--defenses")
    options = _parse_options(values["option"], defenses)
    spec = Spec(
        _default_name(records),
        [RecordSpec(r) for r in records],
        {d: _with_smoke("defense", d, options[d], values["smoke"], "--option") for d in defenses},
        sorted(set(values["seeds"] or [0])),
    )
    for d, opts in spec.defenses.items():
        _check_defense_keys(d, opts, "--option")
    return spec


def _with_smoke(side: str, name: str, options: dict[str, Any], smoke: bool, where: str) -> dict[str, Any]:
    """``options`` over the method's smoke_params when ``smoke`` (or the option ``smoke: true``)."""
    from attack import ATTACKS
    from defense import DEFENSES

    options = dict(options)
    flag = options.pop("smoke", False)
    if not isinstance(flag, bool):
        raise UserError(f"{where}: {side} {name}: 'smoke' must be true or false, got {cfg.brief(flag)}")
    cls = (ATTACKS if side == "attack" else DEFENSES).get(name)
    base = dict(cls.smoke_params) if (smoke or flag) else {}
    return {**base, **options}


def _mapping(value: Any, what: str, path: Path) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{path}: {what} must be a mapping of option names to values")
    return dict(value)


def _methods(value: Any, what: str, path: Path) -> dict[str, dict[str, Any]]:
    """``attacks``/``defenses`` of a grid: a list of names or a mapping name -> options."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return {v: {} for v in value}
    if isinstance(value, dict) and value:
        return {str(k): _mapping(v, f"'{what}: {k}'", path) for k, v in value.items()}
    raise UserError(f"{path}: '{what}' must be a non-empty list of names or a mapping of names to options")


def _names(value: Any, what: str, path: Path, required: bool = True) -> list[str]:
    if value is None and not required:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise UserError(f"{path}: '{what}' must be a non-empty list of names")
    return value


def load_grid(path: Path, values: dict[str, Any]) -> Spec:
    """Read and check a grid file; every name is checked against its registry."""
    from attack import ATTACKS
    from attack.base import resolve_config as resolve_attack
    from utils.datasets import dataset_info
    from utils.models import model_spec

    data = cfg.read_yaml(path)
    unknown = sorted(set(data) - GRID_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown key '{unknown[0]}' (known: {', '.join(sorted(GRID_KEYS))})")
    for key in ("datasets", "attacks", "defenses"):
        if key not in data:
            raise UserError(f"{path}: missing '{key}'")
    datasets = _names(data["datasets"], "datasets", path)
    models = _names(data.get("models"), "models", path, required=False)
    for name in datasets:
        _checked(lambda: dataset_info(name), path)
    for name in models:
        _checked(lambda: model_spec(name), path)
    attacks = {
        _checked(lambda: ATTACKS.canonical(k), path): v for k, v in _methods(data["attacks"], "attacks", path).items()
    }
    grid_defenses = {
        _defense_names([k], str(path))[0]: v for k, v in _methods(data["defenses"], "defenses", path).items()
    }
    seeds = values["seeds"] if values["seeds"] is not None else data.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        raise UserError(f"{path}: 'seeds' must be a non-empty list of integers >= 0")
    template = data.get("record_name", "{attack}_{dataset}_{model}" if models else "{attack}_{dataset}")
    if not isinstance(template, str):
        raise UserError(f"{path}: 'record_name' must be a string such as '{{attack}}_{{dataset}}_{{model}}'")
    common_attack = _mapping(data.get("attack_options"), "'attack_options'", path)
    common_defense = _mapping(data.get("defense_options"), "'defense_options'", path)
    # where runs read and write, and --trust_record: the user's choice, never a grid file's
    cfg.refuse_user_only(
        [
            cfg.Layer(str(path), options)
            for options in (common_attack, common_defense, *attacks.values(), *grid_defenses.values())
        ],
        what="a grid file",
    )

    record_seeds = data.get("record_seeds", False)
    if not isinstance(record_seeds, bool):
        raise UserError(f"{path}: 'record_seeds' must be true or false")
    records: list[RecordSpec] = []
    for dataset in datasets:
        for model in models or [None]:
            for name, opts in attacks.items():
                try:
                    record = cfg.fill_template(template, {"attack": name, "dataset": dataset, "model": model or ""})
                except ValueError as exc:
                    raise UserError(f"{path}: 'record_name' {cfg.brief(template, 60)}: {exc}") from None
                options = {
                    **_with_smoke("attack", name, {**common_attack, **opts}, values["smoke"], str(path)),
                    "dataset": dataset,
                    "save_folder_name": record,
                }
                if model is not None:
                    options["model"] = model
                try:  # checks every key and value before anything runs
                    resolve_attack(name, [], options)
                except UserError as exc:
                    raise UserError(f"{path}: attack {name}: {exc}") from None
                seeded = [(seed_record_name(record, s), s) for s in seeds] if record_seeds else [(record, None)]
                for record_k, seed in seeded:
                    if any(r.record_name == record_k for r in records):
                        raise UserError(
                            f"{path}: two runs would write record '{record_k}' (make 'record_name' tell them apart)"
                        )
                    if seed is None:
                        records.append(RecordSpec(record, name, options))
                    else:
                        records.append(
                            RecordSpec(
                                record_k,
                                name,
                                {**options, "random_seed": seed, "save_folder_name": record_k},
                                seed,
                                record,
                            )
                        )

    if values["defenses"] is not None:
        chosen = _defense_names(values["defenses"], "--defenses")
        grid_defenses = {d: grid_defenses.get(d, {}) for d in chosen}
    extra = _parse_options(values["option"], list(grid_defenses))
    defenses = {
        d: _with_smoke("defense", d, {**common_defense, **opts, **extra[d]}, values["smoke"], str(path))
        for d, opts in grid_defenses.items()
    }
    for d, opts in defenses.items():
        _check_defense_keys(d, opts, str(path))
    name = data.get("name", path.stem)
    if not isinstance(name, str):
        raise UserError(f"{path}: 'name' must be a string")
    purpose = data.get("purpose")
    if purpose is not None and (not isinstance(purpose, str) or not purpose.strip()):
        raise UserError(f"{path}: 'purpose' must be a non-empty string (what the grid is for, shown with its table)")
    resources = cluster.parse_resources(data.get("resources"), [*attacks, *defenses], str(path))
    return Spec(name, records, defenses, sorted(set(seeds)), purpose, resources)


def seed_record_name(record: str, seed: int) -> str:
    """``record_seeds``: the record of seed 0 keeps the grid's name, seed k gets ``<name>_seed<k>``
    (the layout of ``result_name`` (bench/compare.py) for defense results)."""
    return record if seed == 0 else f"{record}_seed{seed}"


def columns_of(spec: Spec) -> list[str]:
    """The table's columns: one per record, or one per attack over its seeds' records."""
    return list(dict.fromkeys(r.column or r.record_name for r in spec.records))


def _checked(fn: Callable[[], Any], path: Path) -> Any:
    try:
        return fn()
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def _check_defense_keys(name: str, options: dict[str, Any], where: str) -> None:
    """Every option names a parameter of the defense harness (types are checked when it runs)."""
    from defense.base import COMMON, DEFENSES

    known = {key for p in [*COMMON, *DEFENSES.get(name).params()] for key in (p.name, *p.aliases)}
    for key in options:
        if key not in known:
            import difflib

            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"{where}: defense {name}: unknown option '{key}'{hint}")
