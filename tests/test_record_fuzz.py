"""Property test of the two record readers: every field of a SAU-Bench record and of a
BackdoorBench record, corrupted one at a time (a wrong type, None, a flipped byte in a
tensor, an out-of-range value, a wrong shape, a deleted key), gives either the original
record (same identity, same tensors) or the project's one-line UserError: never another
exception, never a record that loads with changed content.

BackdoorBench's records carry no digests, so a change that keeps them well-formed (a
flipped byte in the weights, an in-range label) cannot be detected; for those the
property is that the record's identity changes with its content, so that the comparison
never reuses a result made on the original."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utils.errors import UserError
from utils.models import create_model
from utils.records import RECORD_FILE, AttackRecord, load_record
from utils.poison import PoisonedSet

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
KINDS = ("type", "none", "flip", "range", "shape", "delete")
DELETE = object()


def _set(n: int, seed: int, labels: list[int], original: list[int], indices: list[int]) -> PoisonedSet:
    g = torch.Generator().manual_seed(seed)
    return PoisonedSet(
        torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g),
        torch.tensor(labels),
        torch.tensor(original),
        torch.tensor(indices),
    )


def synthetic_record(num_classes: int = 3) -> AttackRecord:
    torch.manual_seed(0)
    model = create_model("cnn", num_classes, 1, (8, 8), (0.5,), (0.5,))
    return AttackRecord(
        model_name="cnn",
        num_classes=num_classes,
        model=model.state_dict(),
        img_size=(8, 8, 1),
        clean_data="digits",
        attack="badnet",
        attack_params={"patch_size": 1},
        poison_indices=torch.tensor([1, 4, 6]),
        bd_test=_set(6, 1, [0] * 6, [1, 2, 1, 2, 1, 2], [0, 2, 5, 7, 8, 9]),
        bd_train=_set(3, 2, [0, 0, 0], [2, 1, 2], [1, 4, 6]),
        cross_test=_set(2, 3, [1, 2], [1, 2], [0, 1]),
        mean=(0.5,),
        std=(0.5,),
        extras={"pattern": torch.ones(1, 8, 8)},
        config={"epochs": 3, "lr": 0.01},
    )


# -- corruptions -------------------------------------------------------------------------------------------


def _leaves(value: Any, path: tuple = ()) -> list[tuple]:
    """Every key path of a nested mapping (inner nodes too)."""
    out = []
    if isinstance(value, dict):
        for key, inner in value.items():
            out.append((*path, key))
            out += _leaves(inner, (*path, key))
    return out


def _corrupt(value: Any, kind: str, position: int) -> Any:
    """``value`` corrupted by ``kind``; None when that kind does not apply to it."""
    if kind == "none":
        return None
    if kind == "delete":
        return DELETE
    if kind == "type":
        return "x" if not isinstance(value, str) else 7
    if isinstance(value, torch.Tensor):
        if kind == "flip":
            if value.numel() == 0:
                return None
            t = value.clone()
            raw = t.view(-1).view(torch.uint8)
            raw[position % raw.numel()] ^= 1 << (position % 8)
            return t
        if kind == "range":
            if value.numel() == 0:
                return None
            t = value.clone()
            flat, i = t.view(-1), position % t.numel()
            if t.dtype == torch.uint8:
                flat[i] = (int(flat[i]) + 128) % 256
            elif t.dtype == torch.bool:
                flat[i] = ~flat[i]
            elif t.is_floating_point():
                flat[i] = float("nan") if position % 2 else float("inf")
            else:
                flat[i] = -1 if position % 2 else 10**6
            return t
        if kind == "shape":
            return value.unsqueeze(0) if position % 2 else value.reshape(-1)[:-1] if value.numel() else value[None]
    if isinstance(value, np.ndarray):
        if kind == "flip":
            a = value.copy()
            raw = a.view(np.uint8).reshape(-1)
            if raw.size == 0:
                return None
            raw[position % raw.size] ^= 1 << (position % 8)
            return a
        if kind == "range" and value.size:
            a = value.copy().astype(np.int64)
            a.reshape(-1)[position % a.size] = -1 if position % 2 else 10**9
            return a
        if kind == "shape":
            return value[:-1] if value.size else value[None]
    if kind == "range":
        if isinstance(value, bool):
            return None
        if isinstance(value, int) or isinstance(value, np.integer):
            return [0, -1, 10**12, 10**6][position % 4]
        if isinstance(value, float):
            return [float("nan"), float("inf"), -1.0, 0.0][position % 4]
        if isinstance(value, (list, tuple)) and value:
            items = list(value)
            items[position % len(items)] = [0, -1, 10**12, float("nan")][position % 4]
            return type(value)(items)
    if kind == "shape" and isinstance(value, (list, tuple)):
        return type(value)([*value, value[0]]) if value and position % 2 else type(value)(list(value)[:-1])
    return None


def _apply(data: dict, path: tuple, new: Any) -> None:
    target = data
    for key in path[:-1]:
        target = target[key]
    if new is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = new


def _get(data: dict, path: tuple) -> Any:
    for key in path:
        data = data[key]
    return data


def _same(a: AttackRecord, b: AttackRecord) -> bool:
    """Identical records: the same identity (a digest of every part) and the same tensors."""
    if a.identity != b.identity:
        return False
    for part in ("bd_test", "bd_train", "cross_test"):
        x, y = getattr(a, part), getattr(b, part)
        if (x is None) != (y is None):
            return False
        if x is not None and not all(torch.equal(x.to_dict()[k], y.to_dict()[k]) for k in x.to_dict()):
            return False
    return (
        torch.equal(a.poison_indices, b.poison_indices)
        and a.model.keys() == b.model.keys()
        and all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    )


def _outcome(folder: Path, original: AttackRecord, *, detectable: bool = True) -> str:
    """'same', 'error' (a one-line UserError) or, where a change cannot be detected,
    'changed' (the identity differs); anything else fails the test."""
    try:
        record = load_record(folder)
    except UserError as exc:
        assert "\n" not in str(exc), str(exc)
        return "error"
    if _same(record, original):
        return "same"
    assert not detectable, f"loaded with changed content: {folder}"
    assert record.identity != original.identity, "changed content, same identity"
    return "changed"


# -- SAU-Bench's records ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ours_valid")
    synthetic_record().save(folder)
    return torch.load(folder / RECORD_FILE, weights_only=True), load_record(folder)


def _our_paths() -> list[tuple]:
    """Every field and part, with three of the weights (the first, a counter, the output layer's)."""
    weights = list(synthetic_record().model)
    keep = {weights[0], next(k for k in weights if k.endswith("num_batches_tracked")), weights[-2]}
    return [
        p for p in _leaves(synthetic_record().to_dict()) if not (p[0] == "model" and len(p) > 1 and p[1] not in keep)
    ]


@pytest.mark.parametrize("path", _our_paths(), ids=lambda p: ".".join(map(str, p)))
def test_every_field_of_our_record_corrupted_any_way(ours, tmp_path, path):
    raw, original = ours
    outcomes = set()
    for kind in KINDS:
        for position in (0, 1, 5):
            data = _copy(raw)
            new = _corrupt(_get(data, path), kind, position)
            if new is None and kind != "none":
                continue
            _apply(data, path, new)
            torch.save(data, tmp_path / RECORD_FILE)
            outcomes.add(_outcome(tmp_path, original))
    assert outcomes <= {"same", "error"}


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    return value


@SETTINGS
@given(path=st.sampled_from(_our_paths()), kind=st.sampled_from(KINDS), position=st.integers(0, 10**6))
def test_random_corruptions_of_our_record(ours, tmp_path_factory, path, kind, position):
    raw, original = ours
    folder = tmp_path_factory.mktemp("ours", numbered=True)
    data = _copy(raw)
    new = _corrupt(_get(data, path), kind, position)
    if new is None and kind != "none":
        return
    _apply(data, path, new)
    torch.save(data, folder / RECORD_FILE)
    _outcome(folder, original)


RANGE = {  # out-of-range values written with matching digests: only the record's checks can refuse them
    "num_classes": lambda r: setattr(r, "num_classes", 10**12),
    "num_classes small": lambda r: setattr(r, "num_classes", 2),
    "bd_test.labels": lambda r: r.bd_test.labels.__setitem__(0, 3),
    "bd_test.original_labels": lambda r: r.bd_test.original_labels.__setitem__(1, -1),
    "bd_test.indices": lambda r: r.bd_test.indices.__setitem__(1, -4),
    "bd_train.labels": lambda r: r.bd_train.labels.__setitem__(2, 10**6),
    "bd_train.original_labels": lambda r: r.bd_train.original_labels.__setitem__(0, 3),
    "bd_train.indices": lambda r: r.bd_train.indices.__setitem__(0, 2),
    "cross_test.labels": lambda r: r.cross_test.labels.__setitem__(0, 9),
    "poison_indices": lambda r: setattr(r, "poison_indices", torch.tensor([1, 4, -6])),
    "poison_indices empty": lambda r: setattr(r, "poison_indices", torch.zeros(0, dtype=torch.long)),
    "mean": lambda r: setattr(r, "mean", (float("inf"),)),
    "std": lambda r: setattr(r, "std", (-0.5,)),
    "std length": lambda r: setattr(r, "std", (0.5, 0.5)),
    "img_size": lambda r: setattr(r, "img_size", (8, 8, 0)),
}


@pytest.mark.parametrize("case", sorted(RANGE))
def test_out_of_range_values_are_refused_even_with_matching_digests(tmp_path, case):
    record = synthetic_record()
    RANGE[case](record)
    record.save(tmp_path)
    with pytest.raises(UserError, match="malformed attack record") as info:
        load_record(tmp_path)
    assert "\n" not in str(info.value)


# -- BackdoorBench's records ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def theirs(tmp_path_factory):
    """A synthetic 10-class BackdoorBench record (digits' sizes), its dict and its reading."""
    from test_backdoorbench import write_bb_record

    root = tmp_path_factory.mktemp("bb_fuzz")
    source = synthetic_record(num_classes=10)
    data = write_bb_record(source, root / "bb", "bb")
    return root / "bb", data, load_record(root / "bb")


def _bb_paths() -> list[tuple]:
    """The dict's fields and their parts, with one data_dict entry's (not all 1437 indicator cells)."""
    paths = []
    for key in ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test"):
        paths.append((key,))
    paths.append(("model", "linear.bias"))
    for part in ("bd_train", "bd_test"):
        for key in ("poison_indicator", "original_index_array", "bd_data_container", "getitem_all"):
            paths.append((part, key))
        for key in ("data_dict", "save_folder_path", "save_file_format"):
            paths.append((part, "bd_data_container", key))
    paths += [
        ("bd_test", "bd_data_container", "data_dict", 2),
        ("bd_test", "bd_data_container", "data_dict", 2, "other_info"),
        ("bd_train", "bd_data_container", "data_dict", 4, "path"),
        ("bd_train", "bd_data_container", "data_dict", 4, "other_info"),
    ]
    return paths


def _bb_get(data: dict, path: tuple) -> Any:
    for key in path:
        if isinstance(key, int) and isinstance(data, dict):
            key = next(k for k in data if int(k) == key)
        data = data[key]
    return data


def _bb_apply(data: dict, path: tuple, new: Any) -> None:
    target = _bb_get(data, path[:-1])
    key = path[-1]
    if isinstance(key, int) and isinstance(target, dict):
        key = next(k for k in target if int(k) == key)
    if new is DELETE:
        del target[key]
    else:
        target[key] = new


def _bb_case(theirs, tmp_path: Path, path: tuple, kind: str, position: int) -> str | None:
    folder, raw, original = theirs
    data = _copy(raw)
    try:
        value = _bb_get(data, path)
    except (KeyError, StopIteration):
        return None
    new = _corrupt(value, kind, position)
    if new is None and kind != "none":
        return None
    _bb_apply(data, path, new)
    work = tmp_path / "bb"
    if not work.exists():
        shutil.copytree(folder, work)
    torch.save(data, work / RECORD_FILE)
    # No digests: a change that leaves the record well-formed (a flipped byte in the
    # weights, an in-range label, bd_train None) loads; its identity must change with it.
    return _outcome(work, original, detectable=False)


@pytest.mark.parametrize("path", _bb_paths(), ids=lambda p: ".".join(map(str, p)))
def test_every_field_of_a_backdoorbench_record_corrupted_any_way(theirs, tmp_path, path):
    for kind in KINDS:
        for position in (0, 1):
            _bb_case(theirs, tmp_path, path, kind, position)


@SETTINGS
@given(path=st.sampled_from(_bb_paths()), kind=st.sampled_from(KINDS), position=st.integers(0, 10**6))
def test_random_corruptions_of_a_backdoorbench_record(theirs, tmp_path_factory, path, kind, position):
    _bb_case(theirs, tmp_path_factory.mktemp("bb", numbered=True), path, kind, position)


def test_out_of_range_labels_and_classes_in_a_backdoorbench_record_are_refused(theirs, tmp_path):
    folder, raw, _ = theirs
    work = tmp_path / "bb"
    shutil.copytree(folder, work)
    for path, value, message in [
        (("num_classes",), 10**12, "'num_classes' must be an integer in 1..100000"),
        (("num_classes",), 3, "'num_classes' is 3 but the model's output layer"),
        (("img_size",), (8, 8, 0), "'img_size' must be"),
        (
            ("bd_test", "bd_data_container", "data_dict", 2, "other_info"),
            [10, 1],
            "'bd_test.labels' holds 10, outside 0..9",
        ),
        (
            ("bd_train", "bd_data_container", "data_dict", 4, "other_info"),
            [0, -1],
            "'bd_train.original_labels' holds -1",
        ),
    ]:
        data = _copy(raw)
        _bb_apply(data, path, value)
        torch.save(data, work / RECORD_FILE)
        with pytest.raises(UserError, match=message):
            load_record(work)
