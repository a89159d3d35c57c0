"""The defense contract (see tools.contract for the rules): the checks that read the class,
and the checks that run it through the harness on an attack record.

    from defense.contract import CONTRACT
    CONTRACT.check_static(MyDefense)                      # registered, documented, ...
    CONTRACT.check_run(MyDefense, record_root)            # loads, evaluates, parses, prints nothing
    CONTRACT.check_deterministic(MyDefense, record_root)  # same seed, same numbers

``record_root`` holds an attack record (``badnet_digits`` by default; tests/conftest.py
makes one in seconds). A class that is not registered (a throwaway class in a test) runs
under a temporary name. tests/test_defense_contract.py applies every check to every
registered defense.
"""

from __future__ import annotations

import hashlib
import typing
from pathlib import Path
from typing import Any

import torch

from defense.base import DEFENSES, Defense, run
from tools.contract import Contract, Guard
from utils.models import Classifier
from utils.records import load_defense_result, record_dir


def folder_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` except the defense results."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "defense" not in p.relative_to(folder).parts
    }


def _returns_the_model(guard: Guard, name: str, args: tuple, result: Any) -> Any:
    if name == "mitigate":
        model = args[1]
        if not isinstance(result, Classifier) or result.name != model.name:
            got = result.name if isinstance(result, Classifier) else type(result).__name__
            raise guard.fail("returns-the-model", f"mitigate returned {got}, not a {model.name}")
    if name == "train":  # training-time: a model of the recipe's architecture
        data = args[1]
        if not isinstance(result, Classifier) or result.name != data.recipe.model:
            got = result.name if isinstance(result, Classifier) else type(result).__name__
            raise guard.fail("returns-the-model", f"train returned {got}, not a {data.recipe.model}")
    return result


def trains_a_model(cls: type[Defense]) -> bool:
    """Does ``cls`` end with a model (a mitigation or a training-time defense), not scores?"""
    return cls.kind in ("mitigation", "training_time")


class DefenseContract(Contract):
    def check_run(
        self, cls: type[Defense], record_root: Path, result_file: str = "badnet_digits", **options: Any
    ) -> dict[str, Any]:
        """Run ``cls`` once through the harness (its smoke_params, on the CPU) with the
        guards on during ``__init__`` and ``mitigate`` (a detector's ``detect`` or ``fit``, a
        training-time defense's ``train``): rules no-record-loading,
        no-evaluation, no-argv, no-printing, returns-the-model and record-untouched.
        Returns the run's summary."""
        folder = record_dir(Path(record_root), result_file)
        before = folder_digest(folder)
        if cls.kind == "data_detection":  # the retraining is the harness's, tested apart (tests/test_detection.py)
            options = {"retrain": False, **options}
        with (
            self.registered(cls) as name,
            self.guarded_methods(cls, ("__init__", "mitigate", "detect", "fit", "train"), _returns_the_model) as guard,
        ):
            try:
                summary = run(
                    name,
                    result_file=result_file,
                    record_root=str(record_root),
                    device="cpu",
                    overwrite=True,
                    **{**cls.smoke_params, **options},
                )
            except Exception:
                guard.raise_first()
                raise
            guard.raise_first()
            after = folder_digest(folder)
            changed = sorted(k for k in {*before, *after} if before.get(k) != after.get(k))
            if changed:
                self.fail(cls, "record-untouched", f"{', '.join(changed[:3])} in {folder} changed")
        return summary

    def check_deterministic(
        self, cls: type[Defense], record_root: Path, result_file: str = "badnet_digits", seed: int = 3, **options: Any
    ) -> None:
        """Two runs with the same seed give the same numbers and the same weights (a
        detector: the same detection metrics and the same scores)."""
        results = []
        if cls.kind == "data_detection":
            options = {"retrain": False, **options}
        with self.registered(cls) as name:
            for _ in range(2):
                summary = run(
                    name,
                    result_file=result_file,
                    record_root=str(record_root),
                    device="cpu",
                    random_seed=seed,
                    overwrite=True,
                    **{**cls.smoke_params, **options},
                )
                folder = record_dir(Path(record_root), result_file) / "defense" / name
                if not trains_a_model(cls):
                    results.append((summary["detection"], (folder / f"{name}_scores.csv").read_text()))
                    continue
                results.append((summary, load_defense_result(folder / "defense_result.pt")["model"]))
        if not trains_a_model(cls):
            (first, scores_first), (second, scores_second) = results
            if first != second or scores_first != scores_second:
                self.fail(
                    cls, "deterministic", f"two runs with seed {seed} gave different scores ({first} and {second})"
                )
            return
        (first, weights_first), (second, weights_second) = results
        if first["after"] != second["after"]:
            self.fail(cls, "deterministic", f"two runs with seed {seed} gave {first['after']} and {second['after']}")
        differ = [k for k in weights_first if not torch.equal(weights_first[k], weights_second[k])]
        if differ:
            self.fail(cls, "deterministic", f"two runs with seed {seed} gave different weights ({differ[0]}, ...)")


CONTRACT = DefenseContract(
    side="defense",
    base=Defense,
    registry=DEFENSES,
    decorator="register_defense",
    harness="defense.base",
    kinds=typing.get_args(typing.get_args(typing.get_type_hints(Defense)["kind"])[0]),
    hints={
        "context": "the model and DefenseData",
        "evaluation": "report progress with data.report(epoch, model, **losses)",
        "seeding": "data.seed, data.generator(); the harness seeds torch before mitigate",
    },
)
