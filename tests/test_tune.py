"""Tuning on a validation split (defense/tune.py, defense.base.validation_split) and
compare --recipes tuned: the study never reads the test set, resumes, and its recipe runs."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import defense
import defense.base as harness
from bench import compare
from defense.base import validation_split
from defense.tune import check_space, main as tune_main, tune
from utils import config as cfg
from utils.errors import UserError

from conftest import import_file

ROOT = Path(__file__).resolve().parents[1]
ship_tuned = import_file(ROOT / "scripts" / "ship_tuned.py", "saubench_ship_tuned")


class Untouchable:
    """Stands in for a test split: any use of it fails the test."""

    def __init__(self, what: str):
        self._what = what

    def __getattr__(self, name):
        raise AssertionError(f"tuning read the {self.__dict__['_what']} ({name})")

    def __len__(self):
        raise AssertionError(f"tuning read the {self._what} (len)")


def _hide_test_sets(monkeypatch):
    """The dataset's test split and the record's backdoor test set become untouchable."""
    real_load_dataset, real_load_record = harness.load_dataset, harness.load_record

    def load_dataset(*args, **kwargs):
        return dataclasses.replace(real_load_dataset(*args, **kwargs), test=Untouchable("clean test set"))

    def load_record(*args, **kwargs):
        record = real_load_record(*args, **kwargs)
        record.bd_test = Untouchable("backdoor test set")
        return record

    monkeypatch.setattr(harness, "load_dataset", load_dataset)
    monkeypatch.setattr(harness, "load_record", load_record)


def test_validation_split_is_seeded_disjoint_and_cut_from_poisoned_training_images(digits_defender):
    record, defender = digits_defender
    split = validation_split(defender, record, 0.25, seed=3)
    again = validation_split(defender, record, 0.25, seed=3)
    other = validation_split(defender, record, 0.25, seed=4)
    assert len(split.train) + len(split.clean) == len(defender) and len(split.clean) == round(0.25 * len(defender))
    assert torch.equal(split.clean.images, again.clean.images) and torch.equal(
        split.backdoor.indices, again.backdoor.indices
    )
    assert not torch.equal(split.clean.images, other.clean.images)

    # the two parts are the clean subset, cut in two: no sample in both
    def rows(images):
        return sorted(bytes(x.numpy()) for x in images)

    assert rows(torch.cat([split.train.clean.images, split.clean.images])) == rows(defender.clean.images)
    # backdoor part: the record's poisoned *training* images whose label the attack changed
    assert len(split.backdoor) > 0
    assert set(split.backdoor.indices.tolist()) <= set(record.bd_train.indices.tolist())
    assert bool((split.backdoor.labels != split.backdoor.original_labels).all())
    assert split.train.monitor is None and split.train.checkpoint is None
    few = validation_split(defender, record, 0.25, seed=3, max_backdoor=5)
    assert len(few.backdoor) == 5
    held = record.bd_train.indices[:10]
    assert not set(validation_split(defender, record, 0.25, seed=3, held_indices=held).backdoor.indices.tolist()) & set(
        held.tolist()
    )
    without = validation_split(defender, dataclasses.replace(record, bd_train=None), 0.25, seed=3)
    assert len(without.backdoor) == 0


def test_every_defense_declares_a_valid_search_space():
    for name in defense.list_defenses():
        if defense.DEFENSES.get(name).kind != "mitigation":  # detectors are not tuned (tune refuses them)
            continue
        space = check_space(defense.DEFENSES.get(name))
        assert space, name


def test_tune_never_reads_the_test_set_and_compare_runs_its_recipe(record_root, monkeypatch):
    _hide_test_sets(monkeypatch)
    summary = tune(
        "sau", result_file="badnet_digits", record_root=str(record_root), trials=8, option=["epochs=1"], device="cpu"
    )
    folder = record_root / "badnet_digits" / "tune" / "sau"
    assert summary["trials"] == 8 and len(summary["history"]) == 8
    assert set(summary["best_params"]) == {"lr", "trigger_norm", "adv_steps", "lmd_2", "lmd_3"}  # epochs fixed
    assert summary["objective"] == "acc-asr" and summary["seed"] == 0
    assert summary["best_value"] == max(t["value"] for t in summary["history"])
    assert json.loads((folder / "summary.json").read_text())["best_params"] == summary["best_params"]
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    assert recipe["recipe"] == "tuned" and "sau-badnet_digits" in recipe["recipe_source"]
    assert recipe["epochs"] == 1 and recipe["lr"] == summary["best_params"]["lr"]
    assert (folder / "study.db").is_file()
    shipped = yaml.safe_load(ship_tuned.shipped_text(folder, "sau", "badnet_digits", "digits"))
    default = cfg.read_yaml(cfg.CONFIG_DIR / "defense" / "sau" / "default.yaml")
    assert shipped["recipe"] == "tuned" and "record/badnet_digits/tune/sau/study.db" in shipped["recipe_source"]
    assert shipped["epochs"] == 1 and shipped["lr"] == recipe["lr"]  # what the study chose ...
    assert not {k for k, v in shipped.items() if k in default and default[k] == v}  # ... not what default.yaml says
    monkeypatch.undo()

    # the record's own study comes first; without one, the shipped recipe of the record's dataset
    assert compare.tuned_recipe(record_root, "badnet_digits", "sau", "digits")[0] == folder / "recipe.yaml"
    shipped = cfg.CONFIG_DIR / "defense" / "ft" / "digits_tuned.yaml"
    assert compare.tuned_recipe(record_root, "badnet_digits", "ft", "digits")[0] == shipped
    assert compare.tuned_recipe(record_root, "badnet_digits", "ft", "mnist")[0] is None
    monkeypatch.setattr(cfg, "tuned_yaml", lambda *args: None)  # as if nothing were shipped: ft has no tuned recipe
    table = compare.run(
        result_file=["badnet_digits"],
        record_root=str(record_root),
        defenses=["sau", "ft"],
        recipes="tuned",
        device="cpu",
        plots=False,
        html=True,
        quiet=True,
    )
    assert table["recipes"] == "tuned" and "Recipes: tuned" in table["markdown"]
    rows = {r["defense"]: r for r in table["rows"]}
    assert rows["sau"]["n"] == 1 and rows["sau"]["asr"] is not None
    assert rows["ft"]["n"] == 0 and "no tuned recipe" in rows["ft"]["problem"]
    result = json.loads((record_root / "badnet_digits" / "defense" / "sau_tuned" / "summary.json").read_text())
    assert Path(result["config"]["yaml_path"]) == folder / "recipe.yaml"
    assert result["config"]["lr"] == pytest.approx(summary["best_params"]["lr"])
    assert not set(result["config"]) & cfg.RECIPE_KEYS  # metadata, not config
    assert not (record_root / "badnet_digits" / "defense" / "ft_tuned").exists()
    out = record_root / "compare" / "badnet_digits_tuned"
    assert "Recipes: tuned" in (out / "table.md").read_text() and 'id="recipes"' in (out / "index.html").read_text()


def test_a_study_resumes_up_to_n_trials_and_refuses_other_settings(record_root):
    common = dict(result_file="badnet_digits", record_root=str(record_root), device="cpu")
    first = tune("ft", trials=2, option=["epochs=1"], **common)
    resumed = tune("ft", trials=3, option=["epochs=1"], **common)
    assert first["trials"] == 2 and resumed["trials"] == 3
    assert [t["params"] for t in resumed["history"][:2]] == [t["params"] for t in first["history"]]
    assert tune("ft", trials=3, option=["epochs=1"], **common)["trials"] == 3  # nothing left to run
    with pytest.raises(UserError, match=r"other settings \(base.epochs\).*--overwrite"):
        tune("ft", trials=3, option=["epochs=2"], **common)
    assert tune("ft", trials=1, option=["epochs=2"], overwrite=True, **common)["trials"] == 1
    again = tune("ft", trials=2, option=["epochs=1"], overwrite=True, **common)  # same seed, same study
    assert [(t["params"], t["value"]) for t in again["history"]] == [
        (t["params"], t["value"]) for t in first["history"]
    ]


def test_tune_refuses_what_it_cannot_do(record_root):
    common = dict(result_file="badnet_digits", record_root=str(record_root), device="cpu")
    with pytest.raises(UserError, match="nothing to search"):
        tune("ft", trials=1, option=["epochs=1", "lr=0.01", "weight_decay=0.0005"], **common)
    with pytest.raises(UserError, match="--option result_name: give it as --result_name"):
        tune("ft", trials=1, option=["result_name=x"], **common)
    with pytest.raises(UserError, match="'epochs' must be int"):
        tune("ft", trials=1, option=["epochs=many"], **common)
    assert not (record_root / "badnet_digits" / "tune").exists()
    outside = record_root.parent / "outside"
    outside.mkdir()
    (record_root / "badnet_digits" / "tune").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UserError, match="leads outside .*symbolic link"):
        tune("ft", trials=1, option=["epochs=1"], **common)
    assert not any(outside.iterdir())


def test_command_line_tune(digits_record_root, tmp_path):
    from conftest import private_copy

    root = private_copy(digits_record_root, tmp_path)
    base = [sys.executable, "-m", "defense", "tune"]
    ok = subprocess.run(
        [
            *base,
            "nad",
            "--result_file",
            "badnet_digits",
            "--record_root",
            str(root),
            "--trials",
            "1",
            "--option",
            "epochs=1",
            "te_epochs=1",
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "recipe:" in ok.stdout and (root / "badnet_digits" / "tune" / "nad" / "recipe.yaml").is_file()
    with pytest.raises(UserError, match="--objective: invalid choice: 'asr'"):
        tune_main(["nad", "--result_file", "badnet_digits", "--record_root", str(root), "--objective", "asr"])
    with pytest.raises(UserError, match="give the defense's name first"):
        tune_main(["--result_file", "badnet_digits"])
