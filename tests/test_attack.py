"""The attack harness and the record contract, checked for every registered attack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attack
from attack.base import resolve_config
from utils.datasets import load_dataset
from utils.errors import UserError
from utils.history import read_csv
from utils.records import load_record

ROOT = Path(__file__).resolve().parents[1]
NAMES = attack.list_attacks()


def quick(name: str, root: Path, **kw) -> dict:
    """A seconds-long run on digits (2 epochs, the attack's smoke_params)."""
    kw = {"epochs": 2, **attack.ATTACKS.get(name).smoke_params, **kw}
    return attack.run(name, dataset="digits", record_root=str(root), save_folder_name=name, device="cpu", **kw)


@pytest.mark.parametrize("name", NAMES)
def test_every_attack_writes_a_record_that_loads(name, tmp_path):
    summary = quick(name, tmp_path)
    folder = tmp_path / name
    for file in ("attack_result.pt", "attack_df.csv", "attack_summary.json", "attack.log", "attack_plot.png"):
        assert (folder / file).is_file(), f"{name}: {file} missing"
    assert json.loads((folder / "attack_summary.json").read_text()) == summary
    record = load_record(folder)  # weights_only, digests checked
    data = load_dataset("digits")
    assert record.attack == name and record.clean_data == "digits" and record.img_size == (8, 8, 1)
    model = record.build_model()
    assert model.eval()(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    bd = record.bd_test
    assert bd.images.dtype == torch.uint8 and bd.images.shape[1:] == (1, 8, 8)
    assert torch.equal(bd.original_labels, data.test.labels[bd.indices])
    cls = attack.ATTACKS.get(name)
    if cls.kind == "clean":
        assert len(bd) == 0 and len(record.poison_indices) == 0
        return
    assert torch.all(bd.labels == 0) and torch.all(bd.original_labels != 0)  # all2one, target 0
    assert len(bd) == int((data.test.labels != 0).sum())
    if record.bd_train is not None:
        assert torch.equal(record.bd_train.indices, record.poison_indices)
        assert torch.equal(record.bd_train.original_labels, data.train.labels[record.poison_indices])
        changed = (record.bd_train.images != data.train.images[record.poison_indices]).flatten(1).any(1)
        assert changed.float().mean() > 0.5, f"{name}: the trigger leaves most poisoned images unchanged"
    if cls.kind == "training-controlled":  # poisoned batch by batch: nothing poisoned at rest
        assert record.bd_train is None and len(record.poison_indices) == 0
    if cls.defines("cross"):  # noise mode: every test sample, true labels
        cross = record.cross_test
        assert cross is not None and torch.equal(cross.indices, torch.arange(len(data.test)))
        assert torch.equal(cross.labels, data.test.labels) and torch.equal(cross.original_labels, data.test.labels)
        assert 0 <= summary["cross_acc"] <= 1
    else:
        assert record.cross_test is None and "cross_acc" not in summary


@pytest.mark.parametrize("name", NAMES)
def test_every_attack_is_deterministic_given_the_seed(name, tmp_path):
    a = quick(name, tmp_path / "a", epochs=1, random_seed=3)
    b = quick(name, tmp_path / "b", epochs=1, random_seed=3)
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    ra = torch.load(tmp_path / "a" / name / "attack_result.pt", weights_only=True)
    rb = torch.load(tmp_path / "b" / name / "attack_result.pt", weights_only=True)
    assert ra["sha256"] == rb["sha256"]
    for part in ("extras", "bd_train", "cross_test", "poison_indices"):
        assert _same(ra[part], rb[part]), f"{name}: {part} differs between two runs with the same seed"


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize(
    "name", [n for n in NAMES if attack.ATTACKS.get(n).kind in ("dirty-label", "training-controlled")]
)
def test_all2all_for_every_label_flipping_attack(name, tmp_path):
    quick(name, tmp_path, epochs=1, attack_label_trans="all2all")
    record = load_record(tmp_path / name)
    assert len(record.bd_test) == 360
    assert torch.equal(record.bd_test.labels, (record.bd_test.original_labels + 1) % 10)
    if record.bd_train is not None:
        assert torch.equal(record.bd_train.labels, (record.bd_train.original_labels + 1) % 10)


def test_exclude_target_class_poisons_non_target_samples_only(tmp_path):
    quick("badnet", tmp_path, epochs=0, exclude_target_class=True)
    record = load_record(tmp_path / "badnet")
    data = load_dataset("digits")
    assert len(record.poison_indices) == round(0.1 * len(data.train))
    assert torch.all(data.train.labels[record.poison_indices] != 0)
    assert torch.equal(record.bd_test.indices, torch.nonzero(data.test.labels != 0).flatten())  # bd test unchanged


def test_mixed_precision_is_opt_in():
    assert resolve_config("badnet", [], {"dataset": "digits"})["amp"] is False
    assert resolve_config("badnet", ["--amp"], {"dataset": "digits"})["amp"] is True


def test_clean_label_attacks_refuse_all2all(tmp_path):
    clean_label = [n for n in NAMES if attack.ATTACKS.get(n).kind == "clean-label"]
    assert clean_label
    for name in clean_label:
        with pytest.raises(UserError, match="clean-label.*all2one"):
            quick(name, tmp_path, attack_label_trans="all2all")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", [n for n in NAMES if attack.ATTACKS.get(n).kind == "clean-label"])
def test_clean_label_attacks_poison_only_target_class_images_and_keep_labels(name, tmp_path):
    quick(name, tmp_path, epochs=0, pratio=0.05)
    record, data = load_record(tmp_path / name), load_dataset("digits")
    assert len(record.poison_indices) == round(0.05 * len(data.train))
    assert torch.all(data.train.labels[record.poison_indices] == 0)  # the target class only
    assert torch.all(record.bd_train.labels == 0) and torch.all(record.bd_train.original_labels == 0)


@pytest.mark.parametrize("name", NAMES)
def test_smoke_params_name_hyperparameters(name):
    cls = attack.ATTACKS.get(name)
    assert set(cls.smoke_params) <= {p.name for p in cls.params()}


def test_badnet_on_digits_record_contents(digits_record_root):
    record = load_record(digits_record_root / "badnet_digits")
    data = load_dataset("digits")
    assert len(record.poison_indices) == round(0.1 * len(data.train))
    # BackdoorBench's draw: all samples, so some target-class samples are poisoned (and keep label 0)
    assert (data.train.labels[record.poison_indices] == 0).any()
    assert torch.all(record.bd_train.labels == 0)
    assert record.config["exclude_target_class"] is False and record.config["amp"] is False
    assert torch.all(record.bd_test.images[:, :, -1, -1] == 255)  # the 1x1 patch at 8x8
    assert record.attack_params == {"patch_size": 0} and int(record.extras["patch_size"]) == 1
    assert record.config["epochs"] == 12 and record.config["model"] == "cnn"
    rows = read_csv(digits_record_root / "badnet_digits" / "attack_df.csv")
    assert len(rows) == 12 and {"train_acc", "test_acc", "test_asr", "test_ra"} <= set(rows[0])


def test_badnet_learns_the_backdoor_on_digits(digits_record_root):
    summary = json.loads((digits_record_root / "badnet_digits" / "attack_summary.json").read_text())
    assert summary["clean_acc"] > 0.85 and summary["asr"] > 0.8


def test_config_precedence_with_the_shipped_files():
    values = resolve_config("badnet", [], {"dataset": "digits"})
    assert values["model"] == "cnn" and values["epochs"] == 30  # config/attack/prototype/digits.yaml
    assert values["pratio"] == 0.1 and values["save_folder_name"] == "badnet_digits"  # badnet/default.yaml
    assert resolve_config("badnet", ["--epochs", "3"], {"dataset": "digits", "epochs": 5})["epochs"] == 3
    assert resolve_config("badnet", [], {"dataset": "digits", "epochs": 5})["epochs"] == 5
    assert resolve_config("badnet", [], {"dataset": "cifar10"})["model"] == "preactresnet18"


def test_bd_yaml_overrides_the_recipe_and_bad_keys_are_refused(tmp_path):
    bd = tmp_path / "bd.yaml"
    bd.write_text("pratio: 0.2\nepochs: 4\n")
    assert resolve_config("badnet", ["--bd_yaml_path", str(bd)], {"dataset": "digits"})["epochs"] == 4
    bd.write_text("pratio: 1.5\n")
    with pytest.raises(UserError, match=r"bd.yaml: 'pratio' must be in \(0, 1\], got 1.5"):
        resolve_config("badnet", ["--bd_yaml_path", str(bd)], {"dataset": "digits"})
    bd.write_text("patch: 3\n")
    with pytest.raises(UserError, match=r"bd.yaml: unknown key 'patch'"):
        resolve_config("badnet", ["--bd_yaml_path", str(bd)], {"dataset": "digits"})


def test_target_outside_the_classes_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(UserError, match="attack_target 12 is not a class"):
        quick("badnet", tmp_path, attack_target=12)
    assert list(tmp_path.iterdir()) == []


def test_existing_record_is_refused_without_overwrite(tmp_path):
    quick("badnet", tmp_path)
    before = (tmp_path / "badnet" / "attack_result.pt").read_bytes()
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        quick("badnet", tmp_path)
    assert (tmp_path / "badnet" / "attack_result.pt").read_bytes() == before
    quick("badnet", tmp_path, overwrite=True, random_seed=1)
    assert (tmp_path / "badnet" / "attack_result.pt").read_bytes() != before


def test_same_seed_same_record(tmp_path):
    a = quick("badnet", tmp_path / "a", random_seed=5)
    b = quick("badnet", tmp_path / "b", random_seed=5)
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    ra, rb = load_record(tmp_path / "a" / "badnet"), load_record(tmp_path / "b" / "badnet")
    assert all(torch.equal(ra.model[k], rb.model[k]) for k in ra.model)


def test_all2all_uses_shifted_labels_and_the_whole_test_set(tmp_path):
    quick("badnet", tmp_path, attack_label_trans="all2all")
    record = load_record(tmp_path / "badnet")
    assert len(record.bd_test) == 360
    assert torch.equal(record.bd_test.labels, (record.bd_test.original_labels + 1) % 10)


def test_command_line_run_and_errors(tmp_path):
    env = {**os.environ, "SAUBENCH_NO_PROGRESS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "attack/badnet.py",
            "--dataset",
            "digits",
            "--epochs",
            "1",
            "--record_root",
            str(tmp_path),
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "badnet_digits" / "attack_result.pt").is_file()
    proc = subprocess.run(
        [sys.executable, "attack/badnet.py", "--dataset", "digitz", "--record_root", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "did you mean digits" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_unknown_model_is_refused_with_a_suggestion(tmp_path):
    with pytest.raises(UserError, match="unknown model 'preactresnet'.*did you mean preactresnet18"):
        quick("badnet", tmp_path, model="preactresnet")
