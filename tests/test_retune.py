"""--retune: the retuning set is seeded, mixes the record's poisoned training samples
(their attacked labels) with clean ones that are not their clean versions, and a run with
--retune adds the retuned model's metrics to summary.json without changing the purified model."""

from __future__ import annotations

import json

import torch

from defense import run
from utils.datasets import load_dataset
from utils.records import load_record
from utils.retune import POISON_SHARE, RETUNE_MIN, retune_set


def test_retune_set_mixes_poisoned_and_clean_samples(digits_record_root):
    record = load_record(digits_record_root / "badnet_digits")
    train = load_dataset("digits").train
    samples = retune_set(train, record.bd_train, seed=3)
    assert samples.poisoned + samples.clean == max(RETUNE_MIN, round(0.01 * len(train))) == len(samples.labels)
    assert samples.poisoned == round(POISON_SHARE * len(samples.labels))
    bd = record.bd_train
    target = bd.labels[bd.labels != bd.original_labels]
    assert bool((samples.labels[: samples.poisoned] == target[0]).all())  # all2one: the target label
    # the poisoned images are the record's, and no clean image is the clean version of one of them
    poisoned_rows = {bytes(img.numpy().tobytes()) for img in bd.images}
    assert all(bytes(img.numpy().tobytes()) in poisoned_rows for img in samples.images[: samples.poisoned])
    again = retune_set(train, bd, seed=3)
    assert torch.equal(again.images, samples.images) and torch.equal(again.labels, samples.labels)
    assert not torch.equal(retune_set(train, bd, seed=4).labels, samples.labels)
    assert retune_set(train, None, seed=0) is None


def test_a_run_with_retune_reports_it_and_keeps_the_purified_model(record_root):
    common = dict(result_file="badnet_digits", record_root=str(record_root), device="cpu", epochs=1)
    plain = run("fst", result_name="fst_plain", **common)
    tuned = run("fst", result_name="fst_retuned", retune=True, **common)
    assert "retune" not in plain
    assert tuned["after"] == plain["after"]  # the purified model is the same
    assert set(tuned["retune"]) >= {"clean_acc", "asr", "ra", "poisoned_samples", "clean_samples"}
    assert 0.0 <= tuned["retune"]["asr"] <= 1.0
    written = json.loads((record_root / "badnet_digits" / "defense" / "fst_retuned" / "summary.json").read_text())
    assert written["retune"] == tuned["retune"]


def test_retune_added_to_a_finished_result_equals_retune_from_the_start(record_root):
    common = dict(result_file="badnet_digits", record_root=str(record_root), device="cpu", epochs=1)
    from_start = run("fst", result_name="fst_start", retune=True, **common)
    finished = run("fst", result_name="fst_later", **common)
    folder = record_root / "badnet_digits" / "defense" / "fst_later"
    weights = (folder / "defense_result.pt").read_bytes()
    later = run("fst", result_name="fst_later", retune=True, **common)  # no --overwrite: only the retuning runs
    assert later["retune"] == from_start["retune"]
    assert later["after"] == finished["after"] and later["seconds"] == finished["seconds"]  # not run again
    assert (folder / "defense_result.pt").read_bytes() == weights
    written = json.loads((folder / "summary.json").read_text())
    assert written["retune"] == from_start["retune"] and written["config"]["retune"] is True
    assert "the defense is not run again" in (folder / "fst.log").read_text()


def test_retune_is_not_added_to_a_result_of_another_config(record_root):
    import pytest

    from utils.errors import UserError

    common = dict(result_file="badnet_digits", record_root=str(record_root), device="cpu")
    run("fst", result_name="fst_other", epochs=1, **common)
    with pytest.raises(UserError):  # the folder holds another run: refused as before, not extended
        run("fst", result_name="fst_other", epochs=2, retune=True, **common)
    summary = json.loads((record_root / "badnet_digits" / "defense" / "fst_other" / "summary.json").read_text())
    assert "retune" not in summary
