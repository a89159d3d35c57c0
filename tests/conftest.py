"""Shared fixtures: a small BadNets record on digits, made once per test session."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

# Before torch starts OpenMP: idle threads sleep instead of spinning, so that the tests'
# command-line subprocesses and a busy machine do not slow the suite down many times over.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("SAUBENCH_NO_PROGRESS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import utils.backdoorbench  # noqa: E402, F401  (registers the reader of BackdoorBench's records, as the harness does)

torch.set_num_threads(min(2, torch.get_num_threads()))

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_record_root(tmp_path_factory) -> Path:
    """A record root holding ``badnet_digits``: BadNets on digits, 12 epochs (about 3 s)."""
    from attack import run

    root = tmp_path_factory.mktemp("records")
    run("badnet", dataset="digits", save_folder_name="badnet_digits", record_root=str(root), epochs=12, device="cpu")
    return root


def private_copy(root: Path, tmp_path: Path) -> Path:
    """A copy of the record root ``root`` in ``tmp_path/record``, for a test that writes results."""
    copy = tmp_path / "record"
    shutil.copytree(root, copy)
    return copy


@pytest.fixture
def record_root(digits_record_root, tmp_path) -> Path:
    """A private copy of the session's record root, for tests that write results."""
    return private_copy(digits_record_root, tmp_path)


@pytest.fixture
def digits_defender(_digits_defender):
    """The session's backdoored digits record and a defender's clean subset (20% of the
    training set, drawn as the harness draws it), on the CPU: a copy of the session's
    DefenseData (the same tensors) with its own outputs (what a method hands over)."""
    import dataclasses

    record, data = _digits_defender
    return record, dataclasses.replace(data)


@pytest.fixture(scope="session")
def _digits_defender(digits_record_root):
    """The session's record and DefenseData behind :func:`digits_defender`."""
    from defense.base import DefenseData, clean_indices
    from utils.datasets import load_dataset
    from utils.records import load_record

    record = load_record(digits_record_root / "badnet_digits")
    data = load_dataset("digits")
    idx = clean_indices(data.train.labels, record.poison_indices, 0.2, 0)
    return record, DefenseData(data.train.subset(idx), data.info, torch.device("cpu"))


def import_file(path: Path, name: str):
    """Import ``path`` (a script, not a package module) as module ``name`` (in sys.modules,
    so that inspect finds its docstring)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
