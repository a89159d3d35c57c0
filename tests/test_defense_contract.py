"""The defense contract, checked for every registered defense: a defense added later is
tested by being registered. The checks are defense.contract's (one function per rule,
tools/contract.py lists the rules); each failure message names the rule that was broken
and says how to fix it. tests/test_contributing.py breaks each rule on purpose."""

from __future__ import annotations

import sys

import pytest

import defense
from defense.contract import CONTRACT, trains_a_model
from utils.records import load_defense_result, load_record

NAMES = defense.list_defenses()
STATIC = CONTRACT.static_checks()


@pytest.mark.parametrize("rule", STATIC)
@pytest.mark.parametrize("name", NAMES)
def test_static_rules(name, rule):
    """registered, documented, year-and-kind, hyperparameters, config."""
    STATIC[rule](defense.DEFENSES.get(name))


@pytest.mark.parametrize("name", NAMES)
def test_runs_on_what_it_is_given_and_writes_a_loadable_result(name, record_root, monkeypatch):
    """no-record-loading, no-evaluation, no-argv, no-printing, returns-the-model,
    record-untouched; then the harness's result loads into the record's architecture."""
    monkeypatch.setattr(sys, "argv", ["pytest", "--garbage-that-argparse-would-reject"])
    cls = defense.DEFENSES.get(name)
    summary = CONTRACT.check_run(cls, record_root)
    record_folder = record_root / "badnet_digits"
    out = record_folder / "defense" / name
    if not trains_a_model(cls):  # a detector: scores and detection metrics, no model
        check_detector_result(name, cls.kind, summary, out, load_record(record_folder))
        return
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


def check_detector_result(name, kind, summary, out, record):
    """A detector's result: summary.json with the detection metrics, one finite score per
    scored sample in <name>_scores.csv (the training set, or the clean and backdoor test
    sets), and no model."""
    import csv
    import math

    for file in ("summary.json", f"{name}_scores.csv", f"{name}.log"):
        assert (out / file).is_file(), f"{name}: the harness did not write {file}"
    assert not (out / "defense_result.pt").exists()
    assert summary["kind"] == kind and 0.0 <= summary["detection"]["auroc"] <= 1.0
    rows = list(csv.DictReader((out / f"{name}_scores.csv").open()))
    assert all(math.isfinite(float(r["score"])) for r in rows)
    sets = {r["set"] for r in rows}
    if kind == "data_detection":
        assert sets == {"train"} and len(rows) == 1437
        assert sum(int(r["poisoned"]) for r in rows) == len(record.bd_train) == summary["detection"]["positives"]
    else:
        assert sets == {"clean_test", "bd_test"} and len(rows) == 360 + len(record.bd_test)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_gives_identical_numbers(name, record_root):
    """deterministic."""
    CONTRACT.check_deterministic(defense.DEFENSES.get(name), record_root)
