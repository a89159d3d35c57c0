"""The defense contract, checked for every registered defense: a defense added later is
tested by being registered. Each failure message names the rule that was broken."""
from __future__ import annotations

import hashlib
import inspect
import sys
from pathlib import Path

import pytest
import torch

import defense
from defense.base import Defense
from utils.config import REQUIRED
from utils.records import load_defense_result, load_record

NAMES = defense.list_defenses()


def folder_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` except the defense results."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "defense" not in p.relative_to(folder).parts}


def smoke(name: str, root: Path, **extra):
    cls = defense.DEFENSES.get(name)
    return defense.run(name, result_file="badnet_digits", record_root=str(root), device="cpu",
                       **{**cls.smoke_params, **extra})


@pytest.mark.parametrize("name", NAMES)
def test_declares_paper_docstring_and_defaulted_hyperparameters(name):
    cls = defense.DEFENSES.get(name)
    assert issubclass(cls, Defense), f"{name}: register a subclass of defense.base.Defense"
    assert cls.paper, f"{name}: set the class attribute `paper` to the citation of the method's paper"
    module_doc = inspect.getmodule(cls).__doc__ or ""
    assert len(module_doc.strip()) > 80, f"{name}: give its module a docstring with the citation, idea and defaults"
    params = cls.params()
    missing = [p.name for p in params if p.default is REQUIRED]
    assert not missing, f"{name}: hyperparameters {missing} need defaults (the paper's) in __init__"
    instance = cls()
    values = instance.hyperparameters()  # each constructor argument is kept as an attribute of the same name
    assert values == {p.name: p.default for p in params}, \
        f"{name}: __init__ must store each hyperparameter unchanged as an attribute of the same name"
    assert set(cls.smoke_params) <= {p.name for p in params}, f"{name}: smoke_params must name hyperparameters"


@pytest.mark.parametrize("name", NAMES)
def test_runs_writes_a_loadable_result_and_leaves_the_record_alone(name, record_root, monkeypatch, capsys):
    record_folder = record_root / "badnet_digits"
    before = folder_digest(record_folder)
    monkeypatch.setattr(sys, "argv", ["pytest", "--garbage-that-argparse-would-reject"])
    summary = smoke(name, record_root)
    assert capsys.readouterr().out == "", f"{name}: a defense must not print (use logging)"
    assert folder_digest(record_folder) == before, f"{name}: a defense must not modify the attack record"
    out = record_folder / "defense" / name
    for file in ("defense_result.pt", f"{name}_df.csv", "summary.json", "index.txt", f"{name}.log"):
        assert (out / file).is_file(), f"{name}: the harness did not write {file}"
    result = load_defense_result(out / "defense_result.pt")
    record = load_record(record_folder)
    model = record.build_model(result["model"])  # same architecture, weights (and masks) load strictly
    assert result["model_name"] == record.model_name and result["num_classes"] == record.num_classes
    assert set(summary) >= {"before", "after", "der", "seconds", "config"}
    assert 0.0 <= summary["after"]["clean_acc"] <= 1.0 and 0.0 <= summary["der"] <= 1.0
    x = record.bd_test.images[:8].float() / 255
    assert model.eval()(x).shape == (8, record.num_classes)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_gives_identical_numbers(name, record_root):
    first = smoke(name, record_root, random_seed=3)
    state_first = load_defense_result(record_root / "badnet_digits" / "defense" / name / "defense_result.pt")["model"]
    second = smoke(name, record_root, random_seed=3, overwrite=True)
    state_second = load_defense_result(record_root / "badnet_digits" / "defense" / name / "defense_result.pt")["model"]
    assert first["after"] == second["after"], f"{name}: two runs with the same seed gave different numbers"
    assert all(torch.equal(state_first[k], state_second[k]) for k in state_first), \
        f"{name}: two runs with the same seed gave different weights (seed every random choice from data.seed)"


@pytest.mark.parametrize("name", NAMES)
def test_has_a_config_for_the_offline_default(name):
    from utils.config import method_yaml

    assert method_yaml("defense", name, "digits") is not None, \
        f"{name}: ship config/defense/{name}/digits.yaml (or default.yaml)"
