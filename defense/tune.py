"""``python -m defense tune NAME``: choose a defense's hyperparameters on a validation
split, never on the test set.

    python -m defense tune sau --result_file badnet_digits --trials 20
    python -m defense tune sau --result_file badnet_digits --trials 8 --option epochs=5   # a fixed value
    python -m defense run sau --result_file badnet_digits \\
        --yaml_path record/badnet_digits/tune/sau/recipe.yaml                             # the chosen recipe
    python defense/compare.py --result_file badnet_digits --defenses sau ft --recipes tuned

What it reads. The defense's recipe for the record's dataset (its reference yaml, or
``--yaml_path``) gives every value the search leaves alone; ``--option KEY=VALUE`` fixes
more (a fixed hyperparameter leaves the search). The harness draws the defender's clean
subset as a run would (``--ratio`` of the recipe, the seed) and cuts the validation split
from it (:func:`defense.base.validation_split`): ``--val_ratio`` of the clean subset held
out for C-Acc, and up to ``--val_backdoor`` of the record's poisoned *training* images
(``bd_train``) for ASR. Each trial trains on the rest of the clean subset; the test set
and the backdoor test set are never read.

The search: the defense's declared ``search_space`` (next to its hyperparameters),
Optuna's TPE sampler seeded with ``--seed``; ``--objective`` is ``acc-asr`` (validation
C-Acc minus validation ASR, the default) or ``der`` (BackdoorBench's DER against the
backdoored model on the same split). ``--max_epochs`` caps the range of ``epochs``
(the budget of a trial). A trial whose training diverges scores the worst value.

Where it writes, inside the record: ``record/<result_file>/tune/<NAME>/``: study.db (the
Optuna study, SQLite: running the command again resumes it, adding trials up to
``--trials``, though the sampler restarts from its seed, so the added trials may differ
from those of an uninterrupted study; a study made with other settings is refused
unless ``--overwrite``; trials a killed run left running are marked failed),
recipe.yaml (the defense's full recipe with the best values, ``recipe: tuned`` naming
the study; what ``--yaml_path`` and ``compare --recipes tuned`` read) and summary.json
(trials, best value and parameters, seed, objective, budget, every trial's numbers).
A tuned recipe is then run with the whole clean subset, like any recipe.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import yaml

from defense.base import (
    DEFENSES,
    Defense,
    DefenseData,
    ValidationSplit,
    evaluate_validation,
    load_inputs,
    resolve_config,
    validation_split,
)
from utils import config as cfg
from utils.cli import entry
from utils.config import Param
from utils.errors import UserError
from utils.metrics import Metrics, der
from utils.files import save_json, save_text
from utils.provenance import provenance
from utils.records import AttackRecord, record_dir
from utils.runtime import log_to, resolve_device, seed_everything

log = logging.getLogger("saubench.tune")

OBJECTIVES = ("acc-asr", "der")
SPACE_KINDS = ("float_log", "float", "int", "choice")

PARAMS: list[Param] = [
    Param("result_file", str, help="attack record name (a folder of --record_root)"),
    Param(
        "trials",
        int,
        20,
        "trials of the study in all (a resumed study adds trials up to this number)",
        check=cfg.positive,
    ),
    Param(
        "objective",
        Literal["acc-asr", "der"],
        "acc-asr",
        "what the study maximises on the validation split: C-Acc - ASR, or DER against the backdoored model",
    ),
    Param("seed", int, 0, "seed of the sampler, of the validation split and of every trial's run", check=cfg.seed),
    Param(
        "val_ratio",
        float,
        0.2,
        "share of the defender's clean subset held out for validation C-Acc",
        check=lambda v: None if 0 < v < 1 else "must be in (0, 1)",
    ),
    Param(
        "val_backdoor",
        int,
        1000,
        "poisoned training images (the record's bd_train) kept for validation ASR",
        check=cfg.positive,
    ),
    Param(
        "max_epochs",
        int | None,
        None,
        "budget: the most epochs a trial may train (caps the range of 'epochs')",
        check=cfg.positive,
    ),
    Param(
        "option",
        list[str] | None,
        None,
        "fixed values KEY=VALUE (YAML values): a hyperparameter given here "
        "is not searched; harness keys such as ratio are accepted too",
    ),
    Param(
        "yaml_path",
        str | None,
        None,
        "the recipe the search starts from (default: the defense's yaml for the record's dataset)",
    ),
    Param("record_root", str, "record", "folder of the records"),
    Param("data_root", str | None, None, "folder holding the datasets (default: the record's)"),
    Param("device", str, "auto", "auto, cpu, cuda or cuda:N"),
    Param("overwrite", bool, False, "start the study again (removes the tune folder's study, recipe and summary)"),
    Param("trust_record", bool, False, "read a record that needs pickle (only from a source you trust)"),
    Param("debug", bool, False, "show tracebacks"),
]


# -- search spaces ---------------------------------------------------------------------------------


def check_space(cls: type[Defense]) -> dict[str, tuple[Any, ...]]:
    """``cls.search_space``, checked against the defense's hyperparameters."""
    params = {p.name: p for p in cls.params()}
    space = dict(cls.search_space)
    for key, spec in space.items():
        where = f"defense {cls.name}: search_space['{key}']"
        if key not in params:
            raise TypeError(f"{where}: not a hyperparameter of {cls.__name__}")
        if not isinstance(spec, tuple) or not spec or spec[0] not in SPACE_KINDS:
            raise TypeError(f"{where}: expected (kind, ...) with kind one of {', '.join(SPACE_KINDS)}, got {spec!r}")
        if spec[0] == "choice":
            if len(spec) != 2 or not isinstance(spec[1], (list, tuple)) or not spec[1]:
                raise TypeError(f"{where}: expected ('choice', [values])")
            continue
        if (
            len(spec) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec[1:])
            or not spec[1] <= spec[2]
        ):
            raise TypeError(f"{where}: expected ({spec[0]!r}, low, high) with low <= high")
        if spec[0] == "float_log" and spec[1] <= 0:
            raise TypeError(f"{where}: a log range needs low > 0")
        if spec[0] == "int" and not all(isinstance(v, int) for v in spec[1:]):
            raise TypeError(f"{where}: an int range needs int bounds")
    return space


def searched_space(cls: type[Defense], fixed: dict[str, Any], max_epochs: int | None) -> dict[str, tuple[Any, ...]]:
    """The declared space without the fixed hyperparameters, ``epochs`` capped at ``max_epochs``."""
    space = {k: v for k, v in check_space(cls).items() if k not in fixed}
    if max_epochs is not None and "epochs" in space and space["epochs"][0] == "int":
        _, low, high = space["epochs"]
        space["epochs"] = ("int", min(low, max_epochs), min(high, max_epochs))
    return space


def suggest(trial: Any, space: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, spec in space.items():
        kind = spec[0]
        if kind == "float_log":
            out[key] = trial.suggest_float(key, spec[1], spec[2], log=True)
        elif kind == "float":
            out[key] = trial.suggest_float(key, spec[1], spec[2])
        elif kind == "int":
            out[key] = trial.suggest_int(key, spec[1], spec[2])
        else:
            out[key] = trial.suggest_categorical(key, list(spec[1]))
    return out


def objective_value(objective: str, after: Metrics, before: Metrics) -> float:
    """The study's score from validation metrics (higher is better)."""
    if objective == "acc-asr":
        return after.clean_acc - after.asr
    value = der(before.asr, after.asr, before.clean_acc, after.clean_acc)
    return float("nan") if value is None else value


WORST = {"acc-asr": -1.0, "der": 0.0}


# -- the command ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m defense tune NAME ARGS``."""
    entry(lambda args, kw: _tune_cli(args), argv, {})


def _tune_cli(argv: Sequence[str]) -> dict[str, Any]:
    if not argv or argv[0].startswith("-"):
        if argv and argv[0] in ("-h", "--help"):
            _parser("NAME").print_help()
            return {}
        raise UserError(
            "python -m defense tune: give the defense's name first, e.g. python -m defense tune sau "
            "--result_file badnet_digits --trials 20"
        )
    summary = tune(argv[0], list(argv[1:]))
    if summary:
        sys.stdout.write(
            f"best {summary['objective']} {summary['best_value']:.4f} with "
            f"{summary['best_params']}\nrecipe: {summary['recipe']}\n"
        )
    return summary


def _parser(name: str) -> argparse.ArgumentParser:
    return cfg.build_parser(f"python -m defense tune {name}", PARAMS, (__doc__ or "").strip().split("\n")[0])


def tune(name: str, argv: Sequence[str] = (), **overrides: Any) -> dict[str, Any]:
    """Run (or resume) the study of defense ``name``; returns summary.json's content.
    From Python: ``tune("sau", result_file="badnet_digits", trials=8, option=["epochs=1"])``."""
    try:
        import optuna
    except ImportError:
        raise UserError(
            'python -m defense tune needs Optuna: pip install -e ".[tune]" (or pip install optuna)'
        ) from None
    cls = DEFENSES.get(DEFENSES.canonical(name))
    if cls.kind == "training_time":
        raise UserError(
            f"defense {cls.name} is a training-time defense: tuning purifies the record's model on a "
            "validation split of the clean subset, a training-time defense trains its own (not supported)"
        )
    if cls.kind != "mitigation":
        raise UserError(
            f"defense {cls.name} is a detector ({cls.kind}): tuning chooses a mitigation's recipe by "
            "validation C-Acc and ASR; a detector has none to tune"
        )
    cli = cfg.parse_cli(_parser(cls.name), argv)
    values = cfg.resolve(PARAMS, [cfg.Layer("keyword arguments", overrides)], cli)
    fixed = _parse_options(values["option"])
    unknown = [
        k
        for k in fixed
        if k
        in (
            "result_file",
            "record_root",
            "yaml_path",
            "random_seed",
            "device",
            "data_root",
            "trust_record",
            "resume",
            "result_name",
        )
    ]
    if unknown:
        raise UserError(f"--option {unknown[0]}: give it as --{unknown[0]} (or not at all: tune sets it)")
    run_keys = {
        "result_file": values["result_file"],
        "record_root": values["record_root"],
        "device": values["device"],
        "random_seed": values["seed"],
        "trust_record": values["trust_record"],
        **({"yaml_path": values["yaml_path"]} if values["yaml_path"] else {}),
        **({"data_root": values["data_root"]} if values["data_root"] else {}),
    }
    base, record = resolve_config(cls.name, [], {**fixed, **run_keys})  # every fixed value checked here
    hyper = {p.name: base[p.name] for p in cls.params()}
    space = searched_space(cls, {k: v for k, v in fixed.items() if k in hyper}, values["max_epochs"])
    if not space:
        raise UserError(
            f"defense {cls.name}: nothing to search (no search_space declared, or every searched "
            "hyperparameter fixed by --option)"
        )

    folder = _tune_folder(Path(values["record_root"]), values["result_file"], cls.name)
    device = resolve_device(values["device"])
    setting = cfg.plain(
        {
            "defense": cls.name,
            "result_file": values["result_file"],
            "record_sha256": record.sha256,
            "objective": values["objective"],
            "seed": values["seed"],
            "val_ratio": values["val_ratio"],
            "val_backdoor": values["val_backdoor"],
            "space": space,
            "base": {
                k: v
                for k, v in base.items()
                if k not in ("debug", "overwrite", "device", "record_root", "data_root", "download", "result_name")
            },
        }
    )

    data, idx = load_inputs(record, base)  # the training split and the clean indices only
    defender = DefenseData(data.train.subset(idx), data.info, device, base["amp"], base["random_seed"])
    split = validation_split(defender, record, values["val_ratio"], values["seed"], values["val_backdoor"], idx)
    if len(split.backdoor) == 0:
        raise UserError(
            f"{record.path}: the record keeps no poisoned training images whose label the attack "
            f"changed (bd_train; attack {record.attack}), so the validation ASR cannot be estimated"
        )
    if values["overwrite"]:  # only once every check has passed
        for leftover in ("study.db", "recipe.yaml", "summary.json", "tune.log"):
            (folder / leftover).unlink(missing_ok=True)
    with log_to(folder, "tune.log"):
        return _study(optuna, cls, values, base, record, hyper, space, split, device, folder, setting)


def _study(
    optuna: Any,
    cls: type[Defense],
    values: dict[str, Any],
    base: dict[str, Any],
    record: AttackRecord,
    hyper: dict[str, Any],
    space: dict[str, tuple[Any, ...]],
    split: ValidationSplit,
    device: torch.device,
    folder: Path,
    setting: dict[str, Any],
) -> dict[str, Any]:
    storage_file = folder / "study.db"
    log.info(
        "tune %s on %s: %d clean samples to train on, %d held out, %d poisoned training images; objective %s, seed %d",
        cls.name,
        record.path,
        len(split.train),
        len(split.clean),
        len(split.backdoor),
        values["objective"],
        values["seed"],
    )
    seed_everything(values["seed"])
    before = evaluate_validation(record.build_model().to(device).eval(), split, device, base["amp"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{storage_file}")
    study_name = f"{cls.name}-{values['result_file']}"
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=values["seed"]),
    )
    made_with = study.user_attrs.get("setting")
    if made_with is None:
        study.set_user_attr("setting", setting)
    elif made_with != setting:
        old, new = _flat(made_with), _flat(setting)
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise UserError(
            f"{storage_file} holds a study made with other settings ({', '.join(diff)}): pass "
            "--overwrite to start again"
        )
    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):  # a killed run's
        storage.set_trial_state_values(stale._trial_id, state=optuna.trial.TrialState.FAIL)
    done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    todo = max(0, values["trials"] - done)
    log.info("study %s: %d trials done, %d to run", storage_file, done, todo)

    def trial_fn(trial: Any) -> float:
        chosen = suggest(trial, space)
        try:
            method = cls(**{**hyper, **chosen})
        except ValueError as exc:  # a combination the method refuses
            trial.set_user_attr("error", str(exc))
            return WORST[values["objective"]]
        seed_everything(values["seed"])
        start = time.perf_counter()
        try:
            purified = method.mitigate(record.build_model().to(device).eval(), split.train)
        except UserError as exc:  # training diverged
            trial.set_user_attr("error", str(exc))
            return WORST[values["objective"]]
        after = evaluate_validation(purified.eval(), split, device, base["amp"])
        value = objective_value(values["objective"], after, before)
        trial.set_user_attr("val", after.headline())
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 2))
        log.info(
            "trial %d: %s  val C-Acc %.4f  ASR %.4f  -> %.4f", trial.number, chosen, after.clean_acc, after.asr, value
        )
        return value if math.isfinite(value) else WORST[values["objective"]]

    if todo:
        study.optimize(trial_fn, n_trials=todo)
    return _write(study, cls, hyper, base, values, before, folder, storage_file, space)


def _flat(setting: dict[str, Any]) -> dict[str, Any]:
    """``{"base": {"epochs": 1}}`` -> ``{"base.epochs": 1}`` (for naming what differs)."""
    out: dict[str, Any] = {}
    for key, value in setting.items():
        if isinstance(value, dict) and key in ("base", "space"):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _parse_options(items: Sequence[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"--option {item!r}: expected KEY=VALUE")
        try:
            out[key] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise UserError(f"--option {item!r}: the value is not valid YAML") from None
    return out


def _tune_folder(root: Path, record_name: str, name: str) -> Path:
    """``<record_root>/<record_name>/tune/<name>`` (``record_name``: --result_file), refused
    when it (links included) leads outside the record root."""
    folder = record_dir(root, record_name) / "tune" / name
    inside = root.resolve()
    if not folder.resolve().is_relative_to(inside):
        raise UserError(f"{folder} leads outside {root} (a symbolic link): refusing to write there")
    return folder


def _write(
    study: Any,
    cls: type[Defense],
    hyper: dict[str, Any],
    base: dict[str, Any],
    values: dict[str, Any],
    before: Metrics,
    folder: Path,
    storage_file: Path,
    space: dict[str, tuple[Any, ...]],
) -> dict[str, Any]:
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    best = study.best_trial
    params = {**hyper, **best.params}
    where = f"{values['result_file']}/tune/{cls.name}/study.db"  # in the record root
    study_ref = f"study {study.study_name} in {where} (trial {best.number} of {len(complete)})"
    recipe = {
        "recipe": "tuned",
        "recipe_source": f"python -m defense tune {cls.name}: {study_ref}",
        "recipe_note": f"chosen on the validation split (objective {values['objective']}, seed "
        f"{values['seed']}); the test set was not read",
        "ratio": base["ratio"],
        **({"index": base["index"]} if base["index"] is not None else {}),
        **cfg.plain(params),
    }
    header = (
        f"# {cls.name} on {values['result_file']}: a tuned recipe written by python -m defense tune.\n"
        f"# Searched: {', '.join(space)}; the other values come from {base['yaml_path'] or 'the defaults'}"
        f"{' and --option' if values['option'] else ''}.\n"
    )
    save_text(header + yaml.safe_dump(recipe, sort_keys=False, width=1000), folder / "recipe.yaml")
    summary = {
        "defense": cls.name,
        "result_file": values["result_file"],
        "study": study.study_name,
        "storage": str(storage_file),
        "objective": values["objective"],
        "seed": values["seed"],
        "trials": len(complete),
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": best.params,
        "best_val": best.user_attrs.get("val"),
        "before_val": before.headline(),
        "budget": {
            "trials": values["trials"],
            "max_epochs": values["max_epochs"],
            "seconds": round(sum(float(t.user_attrs.get("seconds", 0.0)) for t in complete), 2),
        },
        "space": cfg.plain(space),
        "fixed": _parse_options(values["option"]),
        "validation": {"val_ratio": values["val_ratio"], "val_backdoor": values["val_backdoor"]},
        "base_yaml": base["yaml_path"],
        "recipe": str(folder / "recipe.yaml"),
        "history": [
            {
                "number": t.number,
                "value": t.value,
                "params": t.params,
                "val": t.user_attrs.get("val"),
                "error": t.user_attrs.get("error"),
            }
            for t in complete
        ],
        **provenance(),
    }
    save_json(cfg.plain(summary), folder / "summary.json")
    log.info(
        "best %s %.4f (trial %d): %s; recipe written to %s",
        values["objective"],
        best.value,
        best.number,
        best.params,
        folder / "recipe.yaml",
    )
    return summary
