"""Property tests: the record loader and the configuration (YAML, command line, Python
keywords), fed random corruptions and random values, give a valid object or the
project's own error (UserError, which the command line prints as one line), never an
exception from deep inside torch, yaml or argparse."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import attack
import defense
from attack.base import COMMON as ATTACK_COMMON
from defense.base import COMMON as DEFENSE_COMMON
from utils.errors import UserError
from utils.models import create_model
from utils.records import RECORD_FILE, AttackRecord, load_record, tensor_digest
from utils.poison import PoisonedSet

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
DELETE = object()

# -- values ----------------------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
plain = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from([torch.uint8, torch.int64, torch.float32, torch.bool, torch.float16]))
    shape = draw(st.lists(st.integers(0, 4), max_size=4))
    return (torch.arange(math.prod(shape)) % 7).to(dtype).reshape(shape)


values = plain | tensors() | st.dictionaries(st.text(max_size=6), tensors(), max_size=3)


def tiny_record_dict() -> dict:
    model = create_model("cnn", 3, 1, (8, 8), (0.5,), (0.5,))
    bd = PoisonedSet(
        torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
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
        config={"epochs": 3},
    ).to_dict()


@pytest.fixture(scope="module")
def record_bytes(tmp_path_factory) -> bytes:
    folder = tmp_path_factory.mktemp("valid")
    torch.save(tiny_record_dict(), folder / RECORD_FILE)
    return (folder / RECORD_FILE).read_bytes()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scratch")


def valid_or_user_error(folder: Path) -> None:
    """The property: a record that loads is well-formed (and builds its model, or says
    why not); anything else is a UserError."""
    try:
        record = load_record(folder)
    except UserError:
        return
    assert isinstance(record, AttackRecord) and isinstance(record.model_name, str)
    assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in record.model.items())
    assert record.bd_test.images.dtype == torch.uint8 and len(record.img_size) == 3
    if record.model_name == "cnn":
        try:
            record.build_model()
        except UserError:
            pass


# -- the record loader ----------------------------------------------------------------------------------------


@SETTINGS
@given(
    edits=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), max_size=8),
    cut=st.none() | st.integers(0, 10**9),
)
def test_corrupted_record_bytes(record_bytes, scratch, edits, cut):
    data = bytearray(record_bytes)
    for position, byte in edits:
        data[position % len(data)] = byte
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    (scratch / RECORD_FILE).write_bytes(bytes(data))
    valid_or_user_error(scratch)


PATHS = [
    ("model_name",),
    ("num_classes",),
    ("model",),
    ("img_size",),
    ("clean_data",),
    ("attack",),
    ("attack_params",),
    ("poison_indices",),
    ("bd_test",),
    ("bd_test", "images"),
    ("bd_test", "labels"),
    ("bd_test", "indices"),
    ("bd_train",),
    ("bd_train", "original_labels"),
    ("cross_test",),
    ("normalization",),
    ("normalization", "mean"),
    ("extras",),
    ("config",),
    ("sha256",),
    ("version",),
    ("format",),
    ("model", "net.linear.bias"),
]


@SETTINGS
@given(
    changes=st.lists(st.tuples(st.sampled_from(PATHS), st.one_of(values, st.just(DELETE))), min_size=1, max_size=3),
    sign=st.booleans(),
)
def test_records_with_random_fields(scratch, changes, sign):
    data = tiny_record_dict()
    for path, value in changes:
        target = data
        for key in path[:-1]:
            target = target.get(key) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            continue
        if value is DELETE:
            target.pop(path[-1], None)
        else:
            target[path[-1]] = value
    if sign:  # digests that match the changed fields, so that the loader looks further
        try:
            data["sha256"] = {
                "model": tensor_digest(data["model"]),
                "bd_test": tensor_digest({k: v.long() if k != "images" else v for k, v in data["bd_test"].items()}),
            }
        except Exception:
            pass
    try:
        torch.save(data, scratch / RECORD_FILE)
    except Exception:
        assume(False)
    valid_or_user_error(scratch)


# -- YAML and the command line ------------------------------------------------------------------------------------


def valid_or_user_error_setup(run) -> None:
    try:
        values = run()
    except UserError:
        return
    assert isinstance(values, tuple)


ATTACK_KEYS = sorted({p.name for p in ATTACK_COMMON} | {p.name for p in attack.ATTACKS.get("badnet").params()})
DEFENSE_KEYS = sorted({p.name for p in DEFENSE_COMMON} | {p.name for p in defense.DEFENSES.get("sau").params()})


def flags(keys):
    return [f"--{k}" for k in keys] + ["--no-amp", "--no-download", "--", "-x"]


def token(keys):
    return (
        st.sampled_from(flags(keys)) | st.text(max_size=10) | st.integers(-5, 10**12).map(str) | st.floats().map(str)
    ).filter(lambda t: not t.startswith("-h") and not (t.startswith("--") and "--help".startswith(t) and len(t) > 2))


@SETTINGS
@given(mapping=st.dictionaries(st.sampled_from(ATTACK_KEYS) | st.text(max_size=6), plain, max_size=4))
def test_attack_yaml_with_random_keys_and_values(scratch, mapping):
    path = scratch / "bd.yaml"
    path.write_text(yaml.safe_dump(mapping))
    valid_or_user_error_setup(lambda: attack.base.setup("badnet", ["--bd_yaml_path", str(path)], {"dataset": "digits"}))


@SETTINGS
@given(text=st.text(max_size=60))
def test_attack_yaml_with_random_text(scratch, text):
    path = scratch / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    valid_or_user_error_setup(lambda: attack.base.setup("badnet", ["--yaml_path", str(path)], {}))


@SETTINGS
@given(argv=st.lists(token(ATTACK_KEYS), max_size=8))
def test_attack_command_line_with_random_arguments(argv):
    valid_or_user_error_setup(lambda: attack.base.setup("badnet", argv, {}))


@SETTINGS
@given(
    argv=st.lists(token(DEFENSE_KEYS), max_size=6),
    mapping=st.dictionaries(st.sampled_from(DEFENSE_KEYS) | st.text(max_size=6), plain, max_size=3),
)
def test_defense_yaml_and_command_line_with_random_values(digits_record_root, scratch, argv, mapping):
    path = scratch / "sau.yaml"
    path.write_text(yaml.safe_dump(mapping))
    base = ["--result_file", "badnet_digits", "--record_root", str(digits_record_root), "--yaml_path", str(path)]
    valid_or_user_error_setup(lambda: defense.base.setup("sau", [*base, *argv], {}))


@SETTINGS
@given(overrides=st.dictionaries(st.sampled_from(DEFENSE_KEYS), values, max_size=3))
def test_defense_python_keywords_with_random_values(digits_record_root, overrides):
    kw = {"result_file": "badnet_digits", "record_root": str(digits_record_root), **overrides}
    valid_or_user_error_setup(lambda: defense.base.setup("sau", [], kw))
