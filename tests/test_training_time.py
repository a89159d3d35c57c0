"""The training-time kind of the defense harness (defense/training.py): what such a
defense receives (the training set as delivered and the recipe; no poison indicator, no
test data), the files it writes (those of every defense), the refusal of attacks that
control training, the recipe and its overrides, and checkpoints. Parametrized over the
registered training-time defenses, with a throwaway one (plain retraining) that always runs."""

from __future__ import annotations

import dataclasses
import types
from typing import ClassVar

import pytest
import torch

import defense
import defense.base
import utils.train
from defense.contract import CONTRACT
from defense.training import Recipe, TrainingDefense, TrainingSet, check_trainable
from utils.datasets import Dataset, ImageData, load_dataset
from utils.errors import UserError
from utils.metrics import Metrics
from utils.poison import poisoned_training_set
from utils.records import AttackRecord, load_defense_result, load_record

REAL_SAVE = utils.train.Checkpoint.save


class Retrain(TrainingDefense):
    """Plain retraining with the recipe (a throwaway training-time defense for the tests).

    Args:
        epochs: training epochs (None: the recipe's)
    """

    paper = "none (a test)"
    year = 2024
    smoke_params: ClassVar[dict] = {"epochs": 1}

    def __init__(self, epochs: int | None = None, lr: float | None = None):
        self.epochs, self.lr = epochs, lr

    def train(self, data: TrainingSet):
        model = data.new_model()
        optimizer = data.recipe.optimizer(model.parameters())
        scheduler = data.recipe.scheduler(optimizer)
        generator = data.generator()
        start = data.resume(model=model, optimizer=optimizer, scheduler=scheduler, generator=generator)
        for epoch in range(start, data.recipe.epochs):
            stats = data.train_epoch(model, optimizer, epoch=epoch, generator=generator)
            if scheduler is not None:
                scheduler.step()
            data.report(epoch, model, loss=stats["train_epoch_loss_avg_over_batch"])
        return model


TRAINING = [n for n in defense.list_defenses() if defense.DEFENSES.get(n).kind == "training_time"]
CASES = [Retrain, *(defense.DEFENSES.get(n) for n in TRAINING)]
IDS = ["retrain", *TRAINING]


def run(cls, record_root, **options):
    with CONTRACT.registered(cls) as name:
        return name, defense.run(
            name,
            **{
                "result_file": "badnet_digits",
                "record_root": str(record_root),
                "device": "cpu",
                "overwrite": True,
                **cls.smoke_params,
                **options,
            },
        )


def reachable(obj, skip=("monitor", "checkpoint")):
    """Every object reachable from ``obj`` through dataclass fields, attributes, containers
    (``skip``: the harness's own channels, its evaluation and checkpoints)."""
    seen, todo, out = set(), [obj], []
    while todo:
        o = todo.pop()
        if id(o) in seen or isinstance(o, (str, int, float, bool, type(None), torch.device, torch.dtype)):
            continue
        seen.add(id(o))
        out.append(o)
        if isinstance(o, torch.Tensor):
            continue
        if isinstance(o, dict):
            todo.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            todo.extend(o)
        elif hasattr(o, "__dict__") and not isinstance(o, (type, types.ModuleType, types.FunctionType)):
            todo.extend(v for k, v in vars(o).items() if k not in skip)
    return out


@pytest.mark.parametrize("cls", CASES, ids=IDS)
def test_receives_the_training_set_as_delivered_without_indicator_or_test_data(cls, record_root, monkeypatch):
    """The fields are all there is; the training set is the poisoned one as delivered; no
    tensor the defense can reach is the poison indicator, the poison indices or test data."""
    got = []
    monkeypatch.setattr(cls, "train", lambda self, data, inner=cls.train: (got.append(data), inner(self, data))[1])
    run(cls, record_root)
    data = got[0]
    assert {f.name for f in dataclasses.fields(data)} == {
        "train",
        "info",
        "device",
        "amp",
        "seed",
        "recipe",
        "monitor",
        "checkpoint",
    }
    record = load_record(record_root / "badnet_digits")
    clean = load_dataset("digits")
    delivered, indicator = poisoned_training_set(clean.train, record.bd_train)
    assert torch.equal(data.train.images, delivered.images) and torch.equal(data.train.labels, delivered.labels)
    assert type(data.train) is ImageData and data.recipe.model == record.model_name
    forbidden = [
        indicator,
        record.poison_indices,
        record.bd_train.indices,
        clean.test.images,
        clean.test.labels,
        record.bd_test.images,
        record.bd_test.labels,
    ]
    for o in reachable(data):
        assert not isinstance(o, (AttackRecord, Dataset)), f"{cls.__name__} can reach {type(o).__name__}"
        if isinstance(o, torch.Tensor):
            for bad in forbidden:
                assert not (o.shape == bad.shape and torch.equal(o, bad.to(o.dtype))), (
                    f"{cls.__name__} can reach a tensor equal to the poison indicator, indices or test data"
                )


@pytest.mark.parametrize("cls", CASES, ids=IDS)
def test_the_trained_model_depends_on_neither_test_data_nor_poison_indices(cls, record_root, monkeypatch):
    """Test sets replaced by sentinels (NaN-free zeros; the harness's evaluation patched to
    constants) and the record's poison_indices by others: the same weights."""
    constant = Metrics(0.5, 0.5, 0.5, 1.0, 1.0, 1.0)
    monkeypatch.setattr(defense.base, "evaluate", lambda *a, **k: constant)
    run(cls, record_root, result_name="plain")
    load_inputs, load = defense.base.load_inputs, defense.base.load_record

    def sentinel_inputs(record, values):
        data, idx = load_inputs(record, values)
        test = ImageData(torch.full_like(data.test.images, 77), torch.zeros_like(data.test.labels))
        return Dataset(data.info, data.train, test, data.root), idx

    def other_record(*a, **k):
        record = load(*a, **k)
        record.bd_test.images.fill_(13)
        record.poison_indices = torch.randperm(1437)[: len(record.poison_indices)].sort().values
        return record

    monkeypatch.setattr(defense.base, "load_inputs", sentinel_inputs)
    monkeypatch.setattr(defense.base, "load_record", other_record)
    run(cls, record_root, result_name="sentinel")
    out = record_root / "badnet_digits" / "defense"
    a, b = (load_defense_result(out / f / "defense_result.pt")["model"] for f in ("plain", "sentinel"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("cls", CASES, ids=IDS)
def test_writes_the_files_of_every_defense(cls, record_root):
    name, summary = run(cls, record_root)
    out = record_root / "badnet_digits" / "defense" / name
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "defense_result.pt",
            f"{name}_df.csv",
            f"{name}_df_summary.csv",
            "summary.json",
            "index.txt",
            f"{name}.log",
            f"{name}_plot.png",
        ]
    )
    record = load_record(record_root / "badnet_digits")
    result = load_defense_result(out / "defense_result.pt")
    record.build_model(result["model"])
    assert set(summary) >= {"before", "after", "der", "seconds", "record_identity", "config"}
    assert summary["before"] == run(Retrain, record_root)[1]["before"]  # DER against the record's model
    assert (out / "index.txt").read_text() == "".join(f"{i}\n" for i in range(1437))
    header = (out / f"{name}_df.csv").read_text().splitlines()[0]
    assert header.startswith(",epoch,clean_test_loss_avg_over_batch,bd_test_loss_avg_over_batch")


def test_training_controlled_attacks_are_refused_in_one_line(record_root, monkeypatch):
    record = load_record(record_root / "badnet_digits")
    check_trainable("retrain", record)
    for attack in ("wanet", "inputaware", "bpp"):
        with pytest.raises(UserError, match=f"the attack \\({attack}\\) controlled the victim's training"):
            check_trainable("retrain", dataclasses.replace(record, attack=attack))
    with pytest.raises(UserError, match="keeps no poisoned training set"):
        check_trainable("retrain", dataclasses.replace(record, bd_train=None))
    load = defense.base.load_record
    monkeypatch.setattr(defense.base, "load_record", lambda *a, **k: dataclasses.replace(load(*a, **k), attack="wanet"))
    with pytest.raises(UserError) as err:
        run(Retrain, record_root)
    assert "\n" not in str(err.value)
    assert not (record_root / "badnet_digits" / "defense" / "contract_retrain").exists()


def test_recipe_is_the_records_and_the_defense_overrides_it(record_root, caplog):
    record = load_record(record_root / "badnet_digits")
    recipe = Recipe.of_record(record)
    assert recipe == Recipe("cnn", 12, 64, 0.05, "sgd", 0.9, 5e-4, "CosineAnnealingLR")
    assert recipe.overridden(Retrain(epochs=3)) == dataclasses.replace(recipe, epochs=3)
    assert recipe.overridden(Retrain(lr=0.5)).lr == 0.5 and recipe.overridden(Retrain()) == recipe
    bare = dataclasses.replace(record, config={})  # BackdoorBench's records: the dataset's recipe file
    assert Recipe.of_record(bare) == Recipe("cnn", 30, 64, 0.05, "sgd", 0.9, 5e-4, "CosineAnnealingLR")
    with pytest.raises(UserError, match="no training recipe"):
        Recipe.of_record(dataclasses.replace(record, config={}, clean_data="nowhere"))
    _, summary = run(Retrain, record_root, epochs=2, eval_every=1)
    rows = (record_root / "badnet_digits/defense/contract_retrain/contract_retrain_df.csv").read_text().splitlines()
    assert len(rows) == 3 and summary["config"]["epochs"] == 2


def test_an_interrupted_training_time_defense_resumes_to_the_same_weights(record_root, monkeypatch):
    def interrupt(self, e, **extra):
        REAL_SAVE(self, e, **extra)
        if e == 0:
            raise KeyboardInterrupt

    run(Retrain, record_root, epochs=2, result_name="whole")
    monkeypatch.setattr(utils.train.Checkpoint, "save", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(Retrain, record_root, epochs=2, result_name="resumed", overwrite=False)
    monkeypatch.setattr(utils.train.Checkpoint, "save", REAL_SAVE)
    run(Retrain, record_root, epochs=2, result_name="resumed", resume=True, overwrite=False)
    out = record_root / "badnet_digits" / "defense"
    a, b = (load_defense_result(out / f / "defense_result.pt")["model"] for f in ("whole", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "whole/contract_retrain_df.csv").read_text() == (out / "resumed/contract_retrain_df.csv").read_text()


def test_records_cover_the_clean_training_split_a_defender_rebuilds_from(record_root, monkeypatch):
    """The record's clean_train digest (in its fields' digest) is the loaded split's; other
    dataset files are refused in one line before anything is written."""
    from utils.records import split_digest

    record = load_record(record_root / "badnet_digits")
    clean = load_dataset("digits")
    assert record.clean_train == split_digest(clean.train.images, clean.train.labels)
    assert record.to_dict()["clean_train_sha256"] == record.clean_train
    assert dataclasses.replace(record, clean_train="").compute_identity() != record.compute_identity()
    load = defense.base.load_dataset

    def other_files(*a, **k):
        data = load(*a, **k)
        data.train.images[0, 0, 0, 0] ^= 1
        return data

    monkeypatch.setattr(defense.base, "load_dataset", other_files)
    with pytest.raises(UserError, match="is not the one the record was made on"):
        run(Retrain, record_root)
    assert not (record_root / "badnet_digits" / "defense").exists()


def test_tuning_and_the_compare_default_leave_training_time_defenses_out(record_root):
    from bench.grid import _defense_names
    from defense.tune import tune

    with pytest.raises(UserError, match="abl is a training-time defense"):
        tune("abl", result_file="badnet_digits", record_root=str(record_root))
    assert "abl" not in _defense_names(None, "test") and "abl" in _defense_names(["abl"], "test")


def test_compare_puts_training_time_defenses_in_the_mitigations_table(record_root):
    from bench import compare

    result = compare.run(
        result_file=["badnet_digits"],
        record_root=str(record_root),
        device="cpu",
        smoke=True,
        plots=False,
        quiet=True,
        defenses=["ft", "abl"],
        seeds=[0],
    )
    rows = {r["defense"]: r for r in result["rows"]}
    assert rows["abl"]["n"] == 1 and rows["ft"]["n"] == 1 and result["failed"] == 0
    assert "| abl |" in result["markdown"]
