"""The record round trip under weights_only=True, its integrity checks, and the write
discipline (temporary names, staged folders, no overwrite without --overwrite)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from utils.errors import UserError
from utils.models import create_model
from utils.records import (
    RECORD_FILE,
    AttackRecord,
    load_defense_result,
    load_record,
    record_dir,
    save_defense_result,
    tensor_digest,
)
from utils.files import StagedFolder, save_json
from utils.poison import PoisonedSet


class Foreign:
    """An object only pickle can restore."""


def tiny_record() -> AttackRecord:
    model = create_model("cnn", 3, 1, (8, 8), (0.5,), (0.5,))
    bd = PoisonedSet(
        torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8),
        torch.zeros(4, dtype=torch.long),
        torch.tensor([1, 2, 1, 2]),
        torch.tensor([0, 3, 5, 6]),
    )
    return AttackRecord(
        model_name="cnn",
        num_classes=3,
        model=model.state_dict(),
        img_size=(8, 8, 1),
        clean_data="digits",
        attack="badnet",
        attack_params={"patch_size": 1},
        poison_indices=torch.tensor([0, 3, 5, 6]),
        bd_test=bd,
        bd_train=bd,
        mean=(0.5,),
        std=(0.5,),
        extras={"pattern": torch.ones(1, 8, 8)},
        config={"epochs": 3, "nested": {"a": [1, 2]}},
    )


def test_round_trip_loads_with_weights_only(tmp_path):
    record = tiny_record()
    record.save(tmp_path)
    raw = torch.load(tmp_path / RECORD_FILE, weights_only=True)
    assert raw["format"] == "saubench-attack-record" and raw["bd_test"]["images"].dtype == torch.uint8
    loaded = load_record(tmp_path)
    assert loaded.model_name == "cnn" and loaded.img_size == (8, 8, 1) and loaded.path == tmp_path
    assert torch.equal(loaded.bd_test.images, record.bd_test.images)
    assert torch.equal(loaded.poison_indices, record.poison_indices)
    assert loaded.config == record.config and loaded.extras["pattern"].shape == (1, 8, 8)
    model = loaded.build_model()
    x = torch.rand(2, 1, 8, 8)
    reference = create_model("cnn", 3, 1, (8, 8), (0.5,), (0.5,))
    reference.load_state_dict(record.model)
    assert torch.allclose(model.eval()(x), reference.eval()(x))


def test_missing_record_lists_existing_ones(tmp_path):
    tiny_record().save(tmp_path / "one")
    with pytest.raises(UserError, match=r"no attack record named 'two'.*records there: one"):
        load_record(tmp_path / "two")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(
        UserError,
        match=r"empty_folder holds no attack_result.pt \(records in .*: one; looked in "
        r".*empty_folder\); give --record_root",
    ):
        load_record(tmp_path / "empty_folder")


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_damaged_files_give_one_clear_error(tmp_path, damage):
    tiny_record().save(tmp_path)
    path = tmp_path / RECORD_FILE
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"not a torch file" * 10}[damage])
    with pytest.raises(UserError, match="empty|cannot read"):
        load_record(tmp_path)


def test_changed_weights_or_bd_test_are_detected(tmp_path):
    tiny_record().save(tmp_path)
    raw = torch.load(tmp_path / RECORD_FILE, weights_only=True)
    raw["model"]["net.linear.bias"] += 1
    torch.save(raw, tmp_path / RECORD_FILE)
    with pytest.raises(UserError, match="model weights do not match their SHA-256"):
        load_record(tmp_path)
    tiny_record().save(tmp_path)
    raw = torch.load(tmp_path / RECORD_FILE, weights_only=True)
    raw["bd_test"]["labels"][0] = 2
    torch.save(raw, tmp_path / RECORD_FILE)
    with pytest.raises(UserError, match="backdoor test set does not match"):
        load_record(tmp_path)


def test_unknown_format_version_and_pickled_files(tmp_path):
    torch.save({"format": "something-else"}, tmp_path / RECORD_FILE)
    with pytest.raises(UserError, match="unknown format"):
        load_record(tmp_path)
    raw = tiny_record().to_dict()
    raw["version"] = 99
    torch.save(raw, tmp_path / RECORD_FILE)
    with pytest.raises(UserError, match="version 99 is not supported"):
        load_record(tmp_path)
    torch.save({"format": "saubench-attack-record", "x": Foreign()}, tmp_path / RECORD_FILE)
    with pytest.raises(UserError, match="holds a Python object .*Foreign.* only pickle can load"):
        load_record(tmp_path)


def test_weights_that_do_not_fit_the_model_name(tmp_path):
    record = tiny_record()
    record.model_name = "preactresnet18"
    record.save(tmp_path)
    with pytest.raises(UserError, match="do not fit model 'preactresnet18'"):
        load_record(tmp_path).build_model()


def test_digest_depends_on_values_names_and_dtypes():
    a = {"w": torch.ones(3)}
    assert tensor_digest(a) == tensor_digest({"w": torch.ones(3)})
    assert tensor_digest(a) != tensor_digest({"w": torch.tensor([1.0, 1.0, 2.0])})
    assert tensor_digest(a) != tensor_digest({"v": torch.ones(3)})
    assert tensor_digest(a) != tensor_digest({"w": torch.ones(3, dtype=torch.float64)})


def test_defense_result_round_trip_and_tamper_check(tmp_path):
    state = create_model("cnn", 3, 1, (8, 8)).state_dict()
    path = save_defense_result(tmp_path, "cnn", 3, state, {"mask": torch.ones(4)})
    raw = torch.load(path, weights_only=True)
    assert set(raw) >= {"model_name", "num_classes", "model"}  # BackdoorBench's keys
    assert set(raw["model"]) == {k[len("net.") :] for k in state}  # and its key layout
    loaded = load_defense_result(path)
    assert loaded["extras"]["mask"].shape == (4,) and set(loaded["model"]) == set(state)
    raw["model"]["linear.bias"] += 1
    torch.save(raw, path)
    with pytest.raises(UserError, match="SHA-256"):
        load_defense_result(path)


def test_staged_folder_appears_only_on_commit_and_refuses_to_overwrite(tmp_path):
    final = tmp_path / "run"
    staged = StagedFolder(final)
    folder = staged.open()
    save_json({"a": 1}, folder / "summary.json")
    assert not final.exists()
    staged.commit()
    assert json.loads((final / "summary.json").read_text()) == {"a": 1}
    assert not folder.exists()
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        StagedFolder(final).open()
    second = StagedFolder(final, overwrite=True)
    save_json({"a": 2}, second.open() / "summary.json")
    assert json.loads((final / "summary.json").read_text()) == {"a": 1}  # old result kept until commit
    second.commit()
    assert json.loads((final / "summary.json").read_text()) == {"a": 2}
    third = StagedFolder(final, overwrite=True)
    third.open()
    third.discard()
    assert json.loads((final / "summary.json").read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    save_json({"x": 1}, tmp_path / "a.json")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


@pytest.mark.parametrize("name", ["../escape", "/abs/path", "a/../../b", ".hidden", "", " padded"])
def test_record_names_cannot_leave_the_record_folder(tmp_path, name):
    with pytest.raises(UserError):
        record_dir(tmp_path, name)


def test_record_names_may_have_subfolders(tmp_path):
    assert record_dir(tmp_path, "cifar10/badnet") == Path(tmp_path) / "cifar10" / "badnet"
