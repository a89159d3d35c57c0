"""The detection kinds (data_detection, input_detection): what the harness hands a
detector (never the poison indicator, never the test set), the metrics it computes once
(utils.metrics.detection_metrics, checked by hand), and STRIP, Spectral Signatures and
Activation Clustering on their own."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch

import defense
import defense.base as harness
from defense.ac import cluster_class
from defense.base import Defense, DefenseData, Detection, TrainingData, TrainingDataWithClean
from defense.spectral import spectral_scores
from utils.datasets import Dataset, ImageData, load_dataset
from utils.metrics import auroc, detection_metrics, flagged_metrics, tpr_at_fpr
from utils.poison import poisoned_training_set
from utils.records import load_record
from utils.poison import PoisonedSet


# -- the metrics, by hand --------------------------------------------------------------------------


def test_detection_metrics_match_a_hand_computation():
    scores, labels = torch.tensor([0.9, 0.8, 0.3, 0.1]), torch.tensor([1, 0, 1, 0])
    # pairs (positive, negative): (0.9, 0.8) (0.9, 0.1) (0.3, 0.1) ranked right, (0.3, 0.8) wrong: 3/4
    m = detection_metrics(scores, labels, torch.tensor([True, True, False, False]))
    assert m["auroc"] == 0.75
    assert m["tpr_at_5fpr"] == 0.5  # above 0.8 (no negative) only 0.9: one positive of two
    assert (m["tp"], m["fp"], m["fn"], m["tn"], m["flagged"]) == (1, 1, 1, 1, 2)
    assert m["tpr"] == m["recall"] == m["fpr"] == m["precision"] == m["f1"] == 0.5
    assert m["positives"] == 2 and m["negatives"] == 2
    # the ROC curve: threshold 0.9 catches a positive, 0.8 a negative, 0.3 the other positive
    assert m["roc"] == {"fpr": [0.0, 0.0, 0.5, 0.5, 1.0], "tpr": [0.0, 0.5, 0.5, 1.0, 1.0]}


def test_detection_info_csv_has_backdoorbench_columns_and_empty_cells_for_undefined_values():
    from utils.metrics import detection_info_csv

    scores, labels = torch.tensor([0.9, 0.8, 0.3, 0.1]), torch.tensor([1, 0, 1, 0])
    lines = detection_info_csv("r", detection_metrics(scores, labels, scores > 0.85)).splitlines()
    assert lines == [
        "record,TN,FP,FN,TP,TPR,FPR,AUC,target,precision,F1,TPR_at_5FPR,positives,negatives",
        "r,2,0,1,1,0.5,0.0,0.75,None,1.0,0.6666666666666666,0.5,2,2",
    ]
    scores_only = detection_info_csv("r", detection_metrics(scores, labels)).splitlines()[1]
    assert scores_only == "r,,,,,,,0.75,None,,,0.5,2,2"


def _check_curve(points, auroc_value, tolerance):
    fpr, tpr = np.array(points["fpr"]), np.array(points["tpr"])
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # the trapezoid rule
    assert abs(area - auroc_value) <= tolerance, (area, auroc_value)


def test_roc_points_are_monotone_from_0_0_to_1_1_and_their_area_is_the_auroc():
    from utils.metrics import ROC_POINTS, roc_points

    generator = torch.Generator().manual_seed(0)
    labels = torch.rand(60, generator=generator) < 0.3
    scores = torch.randn(60, generator=generator) + labels.float()
    scores[:6] = 0.5  # tied scores: a diagonal step, counted one half by both
    points = roc_points(scores, labels)
    assert len(points["fpr"]) <= ROC_POINTS
    _check_curve(points, auroc(scores, labels), 1e-6)
    _check_curve(roc_points(torch.ones(4), torch.tensor([1, 0, 1, 0])), 0.5, 1e-6)
    # a long curve, thinned to at most ROC_POINTS points: still monotone, both ends, area close
    labels = torch.rand(20000, generator=generator) < 0.1
    scores = torch.randn(20000, generator=generator) + 1.5 * labels.float()
    points = roc_points(scores, labels)
    assert len(points["fpr"]) <= ROC_POINTS
    _check_curve(points, auroc(scores, labels), 2e-3)
    assert roc_points(torch.tensor([0.2, 0.1]), torch.tensor([0, 0])) is None


def test_ties_count_one_half_and_undefined_values_are_none():
    labels = torch.tensor([1, 0, 1, 0])
    assert auroc(torch.tensor([1.0, 1.0, 0.0, 0.0]), labels) == 0.5  # (1 + 0.5 + 0.5 + 0) / 4
    assert auroc(torch.ones(4), labels) == 0.5
    assert auroc(torch.tensor([1.0, 1.0, 1.0, 0.0]), labels) == 0.75  # (0.5 + 1 + 0.5 + 1) / 4
    assert auroc(torch.tensor([0.1, 0.2, 0.9, 0.3]), labels) == 0.5  # (0 + 0 + 1 + 1) / 4
    assert tpr_at_fpr(torch.tensor([0.9, 0.8, 0.7, 0.1]), torch.tensor([1, 1, 0, 0])) == 1.0
    # the one negative at the top: no threshold keeps FPR at 0 and catches a positive
    assert tpr_at_fpr(torch.tensor([0.95, 0.9, 0.8, 0.1]), torch.tensor([0, 1, 1, 0])) == 0.0
    m = detection_metrics(torch.tensor([0.2, 0.1]), torch.tensor([0, 0]), torch.tensor([False, False]))
    assert m["auroc"] is None and m["tpr_at_5fpr"] is None and m["tpr"] is None and m["precision"] is None
    assert m["fpr"] == 0.0
    f = flagged_metrics(torch.tensor([True, False, False]), torch.tensor([1, 1, 0]))
    assert f["precision"] == 1.0 and f["recall"] == 0.5 and f["f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="NaN"):
        auroc(torch.tensor([float("nan"), 1.0]), torch.tensor([0, 1]))


# -- what a detector is given --------------------------------------------------------------------


class _Spy(Defense):
    """A throwaway detector that keeps what the harness gives it."""

    paper = "none (a test)"
    year = 2024
    seen: list = []

    def detect(self, model, data):
        type(self).seen.append(data)
        data.add_summary(seen=len(type(self).seen))
        corner = data.train.images[:, :, -2:, -2:].float().mean((1, 2, 3))  # BadNets' patch is bright
        return Detection(corner, corner > 200)

    def fit(self, model, data):
        type(self).seen.append(data)
        data.add_summary(seen=len(type(self).seen))
        threshold = float(data.clean.images.float().mean())

        def score(x):
            s = x[:, :, -2:, -2:].mean((1, 2, 3)).cpu() * 255
            return Detection(s, s > threshold)

        return score


@pytest.fixture
def spy():
    names = []

    def register(kind):
        cls = type(f"Spy_{kind}", (_Spy,), {"kind": kind, "seen": []})
        name = f"test_spy_{kind}"
        defense.DEFENSES.register(name)(cls)
        names.append(name)
        return name, cls

    yield register
    for name in names:
        defense.DEFENSES.unregister(name)


def _garbled(monkeypatch):
    """From now on the harness loads test sets (clean and backdoor) holding other images."""
    load_inputs, load = harness.load_inputs, harness.load_record

    def inputs(record, values):
        data, idx = load_inputs(record, values)
        return Dataset(data.info, data.train, ImageData(255 - data.test.images, data.test.labels), data.root), idx

    def record(*args, **kw):
        r = load(*args, **kw)
        bd = r.bd_test
        r.bd_test = PoisonedSet(255 - bd.images, bd.labels, bd.original_labels, bd.indices)
        return r

    monkeypatch.setattr(harness, "load_inputs", inputs)
    monkeypatch.setattr(harness, "load_record", record)


def _scores(folder, name):
    return list(csv.DictReader((folder / f"{name}_scores.csv").open()))


def test_a_data_detector_gets_the_training_set_as_delivered_and_nothing_else(spy, record_root, monkeypatch):
    name, cls = spy("data_detection")
    summary = defense.run(name, result_file="badnet_digits", record_root=str(record_root), device="cpu")
    (data,) = cls.seen
    assert type(data) is TrainingData and summary["seen"] == 1  # what it handed over (data.add_summary)
    assert {f.name for f in dataclasses.fields(data)} == {"train", "info", "device", "amp", "seed"}
    assert {f.name for f in dataclasses.fields(data.train)} == {"images", "labels"}
    record = load_record(record_root / "badnet_digits")
    delivered, poisoned = poisoned_training_set(load_dataset("digits").train, record.bd_train)
    assert torch.equal(data.train.images, delivered.images) and torch.equal(data.train.labels, delivered.labels)

    # the harness's metrics: the method's scores against the poison indicator, computed here by hand
    corner = delivered.images[:, :, -2:, -2:].float().mean((1, 2, 3))
    assert summary["detection"] == detection_metrics(corner, poisoned, corner > 200)
    assert summary["detection"]["positives"] == len(record.bd_train) == int(poisoned.sum())
    folder = record_root / "badnet_digits" / "defense" / name
    rows = _scores(folder, name)
    assert [float(r["score"]) for r in rows] == corner.tolist()
    assert [int(r["poisoned"]) for r in rows] == poisoned.int().tolist()
    assert json.loads((folder / "summary.json").read_text())["detection"] == summary["detection"]
    # BackdoorBench's detection_info.csv (detection_pretrain/ac.py, strip.py): its columns first, ours after
    (info,) = list(csv.DictReader((folder / "detection_info.csv").open()))
    assert list(info)[:9] == ["record", "TN", "FP", "FN", "TP", "TPR", "FPR", "AUC", "target"]
    d = summary["detection"]
    assert info["record"] == "badnet_digits" and info["target"] == "None"
    assert [int(info[k]) for k in ("TN", "FP", "FN", "TP")] == [d["tn"], d["fp"], d["fn"], d["tp"]]
    assert float(info["TPR"]) == d["tpr"] and float(info["AUC"]) == d["auroc"] and float(info["F1"]) == d["f1"]
    assert float(info["TPR_at_5FPR"]) == d["tpr_at_5fpr"] and int(info["positives"]) == d["positives"]

    _garbled(monkeypatch)  # other test sets: the same scores (they never reach the detector)
    again = defense.run(name, result_file="badnet_digits", record_root=str(record_root), device="cpu", overwrite=True)
    assert again["detection"] == summary["detection"] and _scores(folder, name) == rows


def test_a_data_detector_may_read_a_clean_subset_that_holds_no_poisoned_sample(spy, record_root):
    name, cls = spy("data_detection")
    cls.uses_clean_subset = True
    summary = defense.run(name, result_file="badnet_digits", record_root=str(record_root), device="cpu", ratio=0.1)
    (data,) = cls.seen
    assert type(data) is TrainingDataWithClean
    assert {f.name for f in dataclasses.fields(data)} == {"train", "info", "device", "amp", "seed", "clean"}
    folder = record_root / "badnet_digits" / "defense" / name
    idx = [int(i) for i in (folder / "index.txt").read_text().split()]
    record = load_record(record_root / "badnet_digits")
    assert len(idx) == len(data.clean) == summary["clean_samples"] == 143
    assert not set(idx) & set(record.poison_indices.tolist())  # no clean twin of a poisoned image
    train = load_dataset("digits").train
    assert torch.equal(data.clean.images, train.images[idx]) and torch.equal(data.clean.labels, train.labels[idx])
    x, y = data.clean_tensors()
    assert x.dtype == torch.float32 and float(x.max()) <= 1.0 and torch.equal(y, train.labels[idx])


def test_an_input_detector_is_fitted_on_the_clean_subset_only(spy, record_root, monkeypatch):
    name, cls = spy("input_detection")
    summary = defense.run(name, result_file="badnet_digits", record_root=str(record_root), device="cpu", ratio=0.1)
    (data,) = cls.seen
    assert type(data) is DefenseData and data.monitor is None and data.checkpoint is None
    folder = record_root / "badnet_digits" / "defense" / name
    idx = [int(i) for i in (folder / "index.txt").read_text().split()]
    assert len(idx) == summary["clean_samples"] == 143
    assert torch.equal(data.clean.images, load_dataset("digits").train.images[idx])

    record = load_record(record_root / "badnet_digits")
    test = load_dataset("digits").test
    scores = torch.cat([test.images, record.bd_test.images])[:, :, -2:, -2:].float().mean((1, 2, 3))
    truth = torch.cat([torch.zeros(len(test)), torch.ones(len(record.bd_test))])
    threshold = float(data.clean.images.float().mean())
    expected = detection_metrics(scores, truth, scores > threshold)
    assert summary["detection"]["auroc"] == pytest.approx(expected["auroc"])
    assert (summary["detection"]["tp"], summary["detection"]["fp"]) == (expected["tp"], expected["fp"])
    rows = _scores(folder, name)
    assert [r["set"] for r in rows] == ["clean_test"] * len(test) + ["bd_test"] * len(record.bd_test)

    _garbled(monkeypatch)  # other test sets: the same fitted detector, other scores
    defense.run(
        name, result_file="badnet_digits", record_root=str(record_root), device="cpu", ratio=0.1, overwrite=True
    )
    fitted = cls.seen[1]
    assert torch.equal(fitted.clean.images, data.clean.images)
    assert _scores(folder, name) != rows


def test_a_detector_returning_a_bad_verdict_is_a_bug_named_as_such(spy, record_root):
    name, cls = spy("data_detection")
    cls.detect = lambda self, model, data: Detection(torch.zeros(3))
    with pytest.raises(TypeError, match="returned 3 scores for 1437 samples"):
        defense.run(name, result_file="badnet_digits", record_root=str(record_root), device="cpu")
    cls.detect = lambda self, model, data: Detection(torch.full((len(data),), float("nan")))
    with pytest.raises(TypeError, match="NaN"):
        defense.run(name, result_file="badnet_digits", record_root=str(record_root), device="cpu")


# -- the methods ---------------------------------------------------------------------------------


def test_spectral_scores_put_a_planted_minority_direction_on_top():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(200, 16, generator=g)
    planted = torch.randn(20, 16, generator=g) * 0.3 + 8.0 * torch.eye(16)[3]
    scores = spectral_scores(torch.cat([clean, planted]))
    assert set(scores.argsort(descending=True)[:20].tolist()) == set(range(200, 220))


def test_activation_clustering_finds_a_small_separate_cluster():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(180, 32)), rng.normal(size=(20, 32)) + 6.0])
    in_small, size, silhouette, membership = cluster_class(x, 10, 2, 0)
    assert in_small[180:].all() and not in_small[:180].any() and size == 0.1
    assert silhouette > 0.15 and membership[180:].min() > membership[:180].max()


def test_listing_shows_the_detectors_kinds():
    from tools.scaffold import listing_text

    text = listing_text("defense", defense.DEFENSES)
    assert "strip  (input_detection, 2019)" in text
    assert "spectral  (data_detection, 2018)" in text and "ac  (data_detection, 2018)" in text
    assert "sau  (mitigation, " in text


def test_compare_puts_detectors_in_their_own_table(record_root):
    from bench import compare

    result = compare.run(
        result_file=["badnet_digits"],
        record_root=str(record_root),
        device="cpu",
        smoke=True,
        plots=False,
        quiet=True,
        defenses=["ft", "spectral", "strip"],
        seeds=[0],
    )
    assert result["failed"] == 0
    assert [r["defense"] for r in result["rows"]] == ["no defense", "ft"]  # the mitigation table as before
    table = result["detection"]
    assert table["detectors"] == ["spectral", "strip"] and table["records"] == ["badnet_digits"]
    for row in table["rows"]:
        summary = json.loads((record_root / "badnet_digits" / "defense" / row["detector"] / "summary.json").read_text())
        assert row["cells"]["badnet_digits"]["auroc"] == pytest.approx(100 * summary["detection"]["auroc"])
    assert "**Detectors on badnet_digits**" in result["markdown"]
    assert "| Detector | AUROC | TPR@5%FPR | F1 | " in result["markdown"]
    assert "detectors on record badnet_digits" in result["terminal"]
    text = (record_root / "compare" / "badnet_digits" / "table.md").read_text()
    assert "| spectral | " in text and "| strip | " in text and "| ft | " in text


def test_data_detection_on_a_record_without_poisoned_training_samples_is_one_user_error(record_root):
    from utils.errors import UserError

    record = load_record(record_root / "badnet_digits")
    record.bd_train = None  # as WaNet's and Input-aware's records: poisoned afresh in each batch
    (record_root / "no_bd_train").mkdir()
    record.save(record_root / "no_bd_train")
    with pytest.raises(UserError, match=r"keeps no poisoned training samples \(bd_train.*data detection \(spectral\)"):
        defense.run("spectral", result_file="no_bd_train", record_root=str(record_root), device="cpu")
    assert not (record_root / "no_bd_train" / "defense").exists()


def test_spectral_and_ac_read_another_layer_when_asked(record_root):
    from utils.errors import UserError

    summary = defense.run(
        "spectral", result_file="badnet_digits", record_root=str(record_root), device="cpu", layer="layer2"
    )
    assert summary["config"]["layer"] == "layer2" and summary["detection"]["auroc"] is not None
    with pytest.raises(UserError, match="model 'cnn' has no layer 'nope' \\(its stages: layer1, layer2, layer3\\)"):
        defense.run("ac", result_file="badnet_digits", record_root=str(record_root), device="cpu", layer="nope")
    assert not (record_root / "badnet_digits" / "defense" / "ac").exists()


def test_retraining_without_the_flagged_samples_removes_the_backdoor(spy, record_root):
    name, cls = spy("data_detection")

    def detect(self, model, data):  # flags the images whose last pixel is white: BadNets' poisoned ones on digits
        corner = data.train.images[:, 0, -1, -1].float()
        return Detection(corner, corner >= 250)

    cls.detect = detect
    summary = defense.run(name, result_file="badnet_digits", record_root=str(record_root), device="cpu")
    retrained = summary["retrained"]  # on by default on digits
    assert retrained["removed"] == summary["detection"]["flagged"] > 0
    assert retrained["asr"] < 0.2 and retrained["clean_acc"] > 0.8
    quiet = defense.run(
        name, result_file="badnet_digits", record_root=str(record_root), device="cpu", retrain=False, overwrite=True
    )
    assert "retrained" not in quiet and quiet["detection"] == summary["detection"]
