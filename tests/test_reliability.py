"""Reliability and safety: every bad input gets one line on stderr, exit status 2 and
nothing written; records load without pickle unless trusted; runs checkpoint, survive
Ctrl-C, NaN losses and SIGKILL, and resume to exactly the weights of an uninterrupted run.
docs/errors.md lists the messages checked here."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import attack
import defense
import utils.train
from utils.errors import UserError
from utils.models import create_model
from utils.records import (
    RECORD_FILE,
    RECORD_READERS,
    AttackRecord,
    checkpoint_epoch,
    load_defense_result,
    load_record,
    register_record_reader,
    save_checkpoint,
)
from utils.files import CHECKPOINT_FILE, StagedFolder, save_json, save_torch
from utils.poison import PoisonedSet

ROOT = Path(__file__).resolve().parents[1]
REAL_SAVE = utils.train.Checkpoint.save


# -- helpers ----------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with its SHA-256."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def command_line(monkeypatch, capsys, script: str, *args: str) -> tuple[int, str]:
    """Run ``attack/<name>.py`` or ``defense/<name>.py`` as the command line does, in this
    process: the exit status and stderr."""
    kind, name = script.removesuffix(".py").split("/")
    monkeypatch.setattr(sys, "argv", [script, *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        (attack.main if kind == "attack" else defense.main)(name)
    return exit_info.value.code, capsys.readouterr().err


def refused(monkeypatch, capsys, root: Path, script: str, *args: str, status: int = 2) -> str:
    """Assert that the run stops with ``status``, one line on stderr and no traceback, and
    that nothing under ``root`` changed; return the line."""
    before = snapshot(root)
    code, err = command_line(monkeypatch, capsys, script, *args)
    lines = err.strip().splitlines()
    assert code == status, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: " if status == 2 else "interrupted: "), err
    assert snapshot(root) == before, "a refused run wrote or changed files"
    return lines[0]


def sau_args(root: Path, *more: str) -> tuple[str, ...]:
    return ("--result_file", "badnet_digits", "--record_root", str(root), "--device", "cpu", *more)


def badnet_args(root: Path, *more: str) -> tuple[str, ...]:
    return ("--dataset", "digits", "--record_root", str(root), "--device", "cpu", "--epochs", "1", *more)


def raw_record(record_root: Path) -> dict:
    return torch.load(record_root / "badnet_digits" / RECORD_FILE, weights_only=True)


def signed(raw: dict) -> dict:
    """``raw`` (a record's dict, changed) with the digests of what it now holds: another
    version of the record, not a tampered one."""
    from utils.records import AttackRecord, record_digests
    from utils.poison import PoisonedSet

    def part(key):
        return None if raw.get(key) is None else PoisonedSet.from_dict(raw[key])

    record = AttackRecord(
        model_name=raw["model_name"],
        num_classes=raw["num_classes"],
        model=raw["model"],
        img_size=tuple(raw["img_size"]),
        clean_data=raw["clean_data"],
        attack=raw["attack"],
        attack_params=raw["attack_params"],
        poison_indices=raw["poison_indices"],
        bd_test=part("bd_test"),
        bd_train=part("bd_train"),
        cross_test=part("cross_test"),
        mean=tuple(raw["normalization"]["mean"]),
        std=tuple(raw["normalization"]["std"]),
        extras=raw["extras"],
        config=raw["config"],
        clean_train=raw.get("clean_train_sha256", ""),
    )
    return {**raw, "sha256": record_digests(record)}


def write_raw(record_root: Path, name: str, data) -> Path:
    folder = record_root / name
    folder.mkdir(parents=True)
    if isinstance(data, bytes):
        (folder / RECORD_FILE).write_bytes(data)
    else:
        torch.save(data, folder / RECORD_FILE)
    return folder


def interrupt_after(epoch: int):
    """A Checkpoint.save that presses Ctrl-C once the checkpoint of ``epoch`` is written."""

    def save(self, e, **extra):
        REAL_SAVE(self, e, **extra)
        if e == epoch:
            raise KeyboardInterrupt

    return save


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- bad input: the record -------------------------------------------------------------------------------


def test_result_file_that_does_not_exist_lists_the_records(monkeypatch, capsys, record_root):
    line = refused(
        monkeypatch, capsys, record_root, "defense/sau.py", "--result_file", "nope", "--record_root", str(record_root)
    )
    assert (
        f"no attack record named 'nope' in {record_root} (records there: badnet_digits; looked in "
        f"{(record_root / 'nope').resolve()})" in line
    )
    assert "give --record_root DIR" in line and "--result_file path/to/nope" in line


def test_result_file_without_a_record_file_lists_the_records(monkeypatch, capsys, record_root):
    (record_root / "empty").mkdir()
    line = refused(
        monkeypatch, capsys, record_root, "defense/sau.py", "--result_file", "empty", "--record_root", str(record_root)
    )
    assert (
        f"{record_root / 'empty'} holds no attack_result.pt (records in {record_root}: badnet_digits; looked in "
        f"{(record_root / 'empty').resolve()})" in line
    )
    assert "give --record_root DIR" in line


def _damaged(record_root: Path, damage: str):
    raw = raw_record(record_root)
    data = (record_root / "badnet_digits" / RECORD_FILE).read_bytes()
    if damage == "empty":
        return b"", "the file is empty"
    if damage == "truncated":
        return data[: len(data) // 3], "not a complete torch file (truncated or corrupted?)"
    if damage == "corrupted":
        return bytes(b ^ 0x5A for b in data[:4096]) + data[4096:], "not a complete torch file"
    if damage == "unknown format":
        return {"format": "some-other-tool", "model": raw["model"]}, "not a SAU-Bench attack record (unknown format)"
    if damage == "unknown version":
        return {**raw, "version": 7}, "record version 7 is not supported (this SAU-Bench reads version 1)"
    if damage == "weights of another model":
        return signed({**raw, "model_name": "preactresnet18"}), "the weights do not fit model 'preactresnet18'"
    if damage == "changed weights":
        raw["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in raw["model"].items()}
        return raw, "the model weights do not match their SHA-256 (the file was changed)"
    if damage == "changed bd test":
        raw["bd_test"]["labels"][:3] = 5
        return raw, "the backdoor test set does not match its SHA-256 (the file was changed)"
    if damage == "malformed":
        return {**raw, "num_classes": "ten"}, "malformed attack record ('num_classes' must be an integer, not str)"
    raise ValueError(damage)


@pytest.mark.parametrize(
    "damage",
    [
        "empty",
        "truncated",
        "corrupted",
        "unknown format",
        "unknown version",
        "weights of another model",
        "changed weights",
        "changed bd test",
        "malformed",
    ],
)
def test_damaged_records_are_refused_with_one_line(monkeypatch, capsys, record_root, damage):
    data, message = _damaged(record_root, damage)
    write_raw(record_root, "bad", data)
    line = refused(
        monkeypatch,
        capsys,
        record_root,
        "defense/sau.py",
        "--result_file",
        "bad",
        "--record_root",
        str(record_root),
        "--device",
        "cpu",
    )
    assert message in line and str(record_root / "bad") in line


def test_record_whose_dataset_files_are_missing(monkeypatch, capsys, record_root, tmp_path):
    raw = raw_record(record_root)
    write_raw(record_root, "on_mnist", signed({**raw, "clean_data": "mnist"}))
    empty = tmp_path / "no_data_here"
    empty.mkdir()
    line = refused(
        monkeypatch,
        capsys,
        record_root,
        "defense/sau.py",
        "--result_file",
        "on_mnist",
        "--record_root",
        str(record_root),
        "--data_root",
        str(empty),
        "--no-download",
        "--device",
        "cpu",
    )
    assert "mnist: files not found; put" in line and str(empty / "mnist") in line


def _imagefolder(root: Path, classes: int, side: int) -> Path:
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(3):
                cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    return root


def _imagefolder_record(record_root: Path, name: str, classes: int = 3) -> None:
    model = create_model("cnn", classes, 3, (8, 8), (0.5,) * 3, (0.5,) * 3)
    bd = PoisonedSet(
        torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
        torch.zeros(2, dtype=torch.long),
        torch.ones(2, dtype=torch.long),
        torch.tensor([0, 1]),
    )
    AttackRecord(
        "cnn",
        classes,
        model.state_dict(),
        (8, 8, 3),
        "imagefolder",
        "badnet",
        {},
        torch.tensor([0]),
        bd,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
    ).save(record_root / name)


@pytest.mark.parametrize("classes,side,says", [(2, 8, "(8, 8, 3) with 2"), (3, 6, "(6, 6, 3) with 3")])
def test_record_whose_dataset_has_another_shape_or_class_count(
    monkeypatch, capsys, record_root, tmp_path, classes, side, says
):
    _imagefolder_record(record_root, "mine", classes=3)
    data = _imagefolder(tmp_path / "images", classes, side)
    line = refused(
        monkeypatch,
        capsys,
        record_root,
        "defense/sau.py",
        "--result_file",
        "mine",
        "--record_root",
        str(record_root),
        "--data_root",
        str(data),
        "--device",
        "cpu",
    )
    assert "the record says imagefolder is (8, 8, 3) with 3 classes, but the files in" in line
    assert line.endswith(f" are {says}")


def test_record_whose_poison_indices_do_not_fit_the_dataset(monkeypatch, capsys, record_root):
    raw = raw_record(record_root)
    poisoned = torch.cat([raw["poison_indices"], torch.tensor([5000])])
    write_raw(record_root, "elsewhere", signed({**raw, "poison_indices": poisoned}))
    line = refused(
        monkeypatch,
        capsys,
        record_root,
        "defense/sau.py",
        "--result_file",
        "elsewhere",
        "--record_root",
        str(record_root),
        "--device",
        "cpu",
    )
    assert "the record's poison indices reach 5000, but the training set has 1437 samples" in line


# -- bad input: names, values, devices, folders ------------------------------------------------------------


def test_unknown_names_suggest_the_closest(monkeypatch, capsys, tmp_path, record_root):
    out = tmp_path / "records"
    line = refused(monkeypatch, capsys, out, "attack/badnet.py", *badnet_args(out), "--dataset", "digitz")
    assert "unknown dataset 'digitz'; did you mean digits?" in line
    line = refused(monkeypatch, capsys, out, "attack/badnet.py", *badnet_args(out), "--model", "preactresnet")
    assert "unknown model 'preactresnet'; did you mean preactresnet18" in line
    line = refused(monkeypatch, capsys, out, "attack/badnett.py", *badnet_args(out))
    assert "unknown attack 'badnett'; did you mean badnet" in line
    line = refused(monkeypatch, capsys, record_root, "defense/saw.py", *sau_args(record_root))
    assert "unknown defense 'saw'; did you mean sau" in line
    assert not out.exists()


@pytest.mark.parametrize(
    "yaml_text,message",
    [
        ("epochs: 1\nadv_step: 3\n", "unknown key 'adv_step' (did you mean 'adv_steps'?)"),
        ("epochs: ten\n", "'epochs' must be int, got 'ten'"),
        ("epochs: -1\n", "'epochs' must be >= 0, got -1"),
        ("lr: .nan\n", "'lr' must be a finite float, got nan"),
        ("ratio: 1.5\n", "'ratio' must be in (0, 1], got 1.5"),
        ("ratio: 0.0001\n", "--ratio 0.0001 gives an empty clean subset (1437 training samples)"),
        ("epochs: [1,\n", "not valid YAML (line 2)"),
        ("random_seed: 2020-13-45\n", "a value YAML cannot read"),
        ("trust_record: true\n", "'trust_record' can be given only on the command line"),
    ],
)
def test_bad_defense_yaml(monkeypatch, capsys, record_root, tmp_path, yaml_text, message):
    path = tmp_path / "sau.yaml"
    path.write_text(yaml_text)
    line = refused(monkeypatch, capsys, record_root, "defense/sau.py", *sau_args(record_root, "--yaml_path", str(path)))
    assert message in line


@pytest.mark.parametrize(
    "yaml_text,message",
    [
        ("pratio: 1.5\n", "'pratio' must be in (0, 1], got 1.5"),
        ("pratio: 0\n", "'pratio' must be in (0, 1], got 0"),
        ("attack_target: 10\n", "attack_target 10 is not a class"),
        ("epochs: -3\n", "'epochs' must be >= 0, got -3"),
        ("patch: 3\n", "unknown key 'patch'"),
        ("save_folder_name: ../../outside\n", "must be a folder name inside"),
        ("random_seed: 99999999999\n", "'random_seed' must be in 0..4294967295"),
    ],
)
def test_bad_attack_yaml(monkeypatch, capsys, tmp_path, yaml_text, message):
    path = tmp_path / "bd.yaml"
    path.write_text(yaml_text)
    out = tmp_path / "records"
    line = refused(monkeypatch, capsys, tmp_path, "attack/badnet.py", *badnet_args(out, "--bd_yaml_path", str(path)))
    assert message in line
    assert not out.exists()


def test_cuda_requested_on_a_machine_without_it(monkeypatch, capsys, record_root, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = refused(monkeypatch, capsys, record_root, "defense/sau.py", *sau_args(record_root)[:-2], "--device", "cuda")
    assert "--device cuda: CUDA is not available on this machine (use --device cpu or auto)" in line
    out = tmp_path / "records"
    refused(monkeypatch, capsys, tmp_path, "attack/badnet.py", *badnet_args(out)[:-4], "--device", "cuda:1")
    assert not out.exists()


def test_unknown_devices_and_options(monkeypatch, capsys, record_root):
    line = refused(monkeypatch, capsys, record_root, "defense/sau.py", *sau_args(record_root)[:-2], "--device", "tpu")
    assert "unknown device 'tpu' (use auto, cpu, cuda or cuda:N)" in line
    line = refused(monkeypatch, capsys, record_root, "defense/sau.py", *sau_args(record_root, "--nope", "1"))
    assert "defense/sau.py: unrecognized arguments: --nope 1" in line


def test_data_root_that_does_not_exist(monkeypatch, capsys, record_root, tmp_path):
    missing = tmp_path / "no" / "such" / "folder"
    line = refused(
        monkeypatch, capsys, record_root, "defense/sau.py", *sau_args(record_root, "--data_root", str(missing))
    )
    assert f"--data_root {missing} does not exist" in line
    out = tmp_path / "records"
    line = refused(monkeypatch, capsys, tmp_path, "attack/badnet.py", *badnet_args(out, "--data_root", str(missing)))
    assert f"--data_root {missing} does not exist" in line


def test_index_files_out_of_range_poisoned_or_unreadable(monkeypatch, capsys, record_root, tmp_path):
    poisoned = sorted(load_record(record_root / "badnet_digits").poison_indices.tolist())
    clean = next(i for i in range(1437) if i not in set(poisoned))
    index = tmp_path / "index.txt"
    for text, message, extra in [
        ("1\n99999\n", "indices must be in 0..1436", ()),
        (
            f"{clean}\n{poisoned[0]}\n",
            f"indices [{poisoned[0]}] are poisoned training samples (--exclude_poisoned refuses them)",
            ("--exclude_poisoned",),
        ),  # accepted without the flag
        ("one\ntwo\n", "cannot read clean indices", ()),
        ("", "the file holds no index", ()),
    ]:
        index.write_text(text)
        line = refused(
            monkeypatch, capsys, record_root, "defense/sau.py", *sau_args(record_root, "--index", str(index), *extra)
        )
        assert f"--index {index}: {message}" in line


@pytest.mark.parametrize(
    "script,args",
    [
        ("attack/badnet.py", ("--save_folder_name", "../escape")),
        ("attack/badnet.py", ("--save_folder_name", "/tmp/absolute")),
        ("defense/sau.py", ("--result_name", "../../escape")),
        ("defense/sau.py", ("--result_file", "../badnet_digits")),
    ],
)
def test_paths_never_leave_the_record_folder(monkeypatch, capsys, record_root, script, args):
    base = badnet_args(record_root) if script.startswith("attack") else sau_args(record_root)
    line = refused(monkeypatch, capsys, record_root.parent, script, *base, *args)
    assert "must be a folder name inside" in line or "must be a plain folder name" in line


# -- safety: pickle only when trusted ------------------------------------------------------------------------


def test_a_record_that_needs_pickle_needs_trust_record(monkeypatch, capsys, record_root):
    raw = raw_record(record_root)
    raw["config"]["made_in"] = Path("/somewhere")  # a Python object: only pickle restores it
    write_raw(record_root, "foreign", signed(raw))
    line = refused(
        monkeypatch,
        capsys,
        record_root,
        "defense/sau.py",
        "--result_file",
        "foreign",
        "--record_root",
        str(record_root),
        "--device",
        "cpu",
    )
    assert "holds a Python object (pathlib.PosixPath) that only pickle can load" in line
    assert "pass --trust_record to unpickle it if you trust where it came from" in line
    record = load_record(record_root / "foreign", trust=True)
    original = load_record(record_root / "badnet_digits").sha256
    assert record.config["made_in"] == Path("/somewhere") and record.sha256["model"] == original["model"]
    assert record.sha256["fields"] != original["fields"]  # its config differs
    summary = defense.run(
        "sau", result_file="foreign", record_root=str(record_root), device="cpu", epochs=0, trust_record=True
    )
    assert "trust_record" not in summary["config"]  # how a run was made, not what it computed


def test_foreign_formats_plug_into_load_record(record_root):
    raw = raw_record(record_root)
    write_raw(record_root, "elsewhere", {"tool": "other", "weights": raw["model"]})

    def reader(data, path):
        if not (isinstance(data, dict) and data.get("tool") == "other"):
            return None
        base = load_record(record_root / "badnet_digits")
        base.model = data["weights"]
        return base

    register_record_reader(reader)
    try:
        assert load_record(record_root / "elsewhere").path == record_root / "elsewhere"
    finally:
        RECORD_READERS.remove(reader)
    with pytest.raises(UserError, match="unknown format"):
        load_record(record_root / "elsewhere")


# -- durability: atomic files, checkpoints, resume ------------------------------------------------------------


def test_a_write_killed_halfway_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    save_torch({"v": torch.ones(3)}, path)
    before = path.read_bytes()

    def dies_halfway(obj, target):  # target: a file object (save_torch writes through one) or a path
        half = before[: len(before) // 2]
        target.write(half) if hasattr(target, "write") else Path(target).write_bytes(half)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_torch({"v": torch.zeros(3)}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_ctrl_c_while_a_checkpoint_is_written_waits_for_it(tmp_path, monkeypatch):
    real = torch.save

    def interrupted_save(obj, target):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the write
        real(obj, target)

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 4, "weights": torch.arange(5)}, tmp_path / CHECKPOINT_FILE)
    assert checkpoint_epoch(tmp_path / CHECKPOINT_FILE) == 4  # complete, and in place


def test_a_killed_commit_restores_the_previous_result(tmp_path):
    final = tmp_path / "run"
    staged = StagedFolder(final)
    save_json({"a": 1}, staged.open() / "summary.json")
    staged.commit()
    os.replace(final, tmp_path / ".run.old")  # killed between the two renames of a second commit
    StagedFolder(final)
    assert (final / "summary.json").read_text().strip() == '{\n  "a": 1\n}'


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_run_on_a_folder_being_written_stops_and_leaves_the_first_alone(tmp_path):
    final = tmp_path / "run"
    first = StagedFolder(final)
    staging = first.open()
    save_json({"epoch": 3}, staging / "progress.json")
    alive = os.getppid()  # another live process of this host
    first.lock.write_text(f"{alive} {socket.gethostname()}\n")
    with pytest.raises(
        UserError,
        match=rf"^{re.escape(str(final))} is being written by another run \(process "
        rf"{alive}\); wait for it to finish, or remove .*\.run\.lock if that run",
    ):
        StagedFolder(final, overwrite=True).open()
    first.lock.write_text(f"{alive} another-host\n")
    with pytest.raises(UserError, match=rf"\(process {alive} on host another-host\)"):
        StagedFolder(final).open()
    assert (staging / "progress.json").exists()  # the first run's folder is untouched

    first.lock.write_text("")  # just created by a run that has not written its pid yet
    with pytest.raises(UserError, match=r"another run \(a run that is starting\)"):
        StagedFolder(final).open()
    os.utime(first.lock, (time.time() - 60, time.time() - 60))  # left empty by a run killed then
    assert StagedFolder(final).open() == staging and first.lock.read_text().startswith(f"{os.getpid()} ")
    first.lock.write_text(f"{_dead_pid()} {socket.gethostname()}\n")  # its process was killed
    second = StagedFolder(final)
    assert list(second.open().iterdir()) == []
    assert first.lock.read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    second.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the lock is given back
    third = StagedFolder(tmp_path / "other")
    third.open()
    third.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_run_on_a_locked_result_folder_is_one_line_and_writes_nothing(record_root, monkeypatch, capsys):
    lock = record_root / "badnet_digits" / "defense" / ".ft.lock"
    lock.parent.mkdir(exist_ok=True)
    lock.write_text(f"{os.getppid()} {socket.gethostname()}\n")
    line = refused(monkeypatch, capsys, record_root, "defense/ft.py", *sau_args(record_root, "--epochs", "1"))
    assert line.endswith(f"remove {lock} if that run is gone")


def test_checkpoints_load_weights_only_and_finished_runs_keep_none(record_root, monkeypatch):
    monkeypatch.setattr(utils.train.Checkpoint, "save", interrupt_after(0))
    with pytest.raises(
        KeyboardInterrupt,
        match=r"checkpoint of epoch 0 is kept in .*\.ft\.partial; run the same "
        r"command with --resume",
    ):
        defense.run("ft", result_file="badnet_digits", record_root=str(record_root), device="cpu", epochs=2)
    partial = record_root / "badnet_digits" / "defense" / ".ft.partial"
    state = torch.load(partial / CHECKPOINT_FILE, weights_only=True)
    assert state["epoch"] == 0 and set(state["objects"]) == {"model", "optimizer", "scheduler", "scaler", "generator"}
    assert state["rng"]["torch"].dtype == torch.uint8 and len(state["extra"]["history"]) == 1
    monkeypatch.setattr(utils.train.Checkpoint, "save", REAL_SAVE)
    defense.run("ft", result_file="badnet_digits", record_root=str(record_root), device="cpu", epochs=2, resume=True)
    done = record_root / "badnet_digits" / "defense"
    assert sorted(p.name for p in done.iterdir()) == ["ft"] and not (done / "ft" / CHECKPOINT_FILE).exists()


RESUMED_ATTACKS = {
    "badnet": {},
    "inputaware": {"clean_train_epochs": 1},
    "blind": {"batch_history_len": 5},
    "lira": {"both_train_epochs": 1},
}  # lira: the interruption falls between its two stages


@pytest.mark.parametrize("name", sorted(RESUMED_ATTACKS))
def test_an_interrupted_attack_resumes_to_the_same_weights(name, tmp_path, monkeypatch):
    kw = {
        "dataset": "digits",
        "record_root": str(tmp_path),
        "device": "cpu",
        "epochs": 2,
        "batch_size": 128,
        **attack.ATTACKS.get(name).smoke_params,
        **RESUMED_ATTACKS[name],
    }
    attack.run(name, save_folder_name="whole", **kw)
    monkeypatch.setattr(utils.train.Checkpoint, "save", interrupt_after(0))
    with pytest.raises(KeyboardInterrupt):
        attack.run(name, save_folder_name="resumed", **kw)
    monkeypatch.setattr(utils.train.Checkpoint, "save", REAL_SAVE)
    attack.run(name, save_folder_name="resumed", resume=True, **kw)
    whole, resumed = load_record(tmp_path / "whole"), load_record(tmp_path / "resumed")
    assert same_weights(whole.model, resumed.model) and same_weights(whole.extras, resumed.extras)
    assert (tmp_path / "whole/attack_df.csv").read_text() == (tmp_path / "resumed/attack_df.csv").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resumed", "whole"]


RESUMABLE = {
    "sau": {"epochs": 2},
    "ft": {"epochs": 2},
    "fp": {"epochs": 2, "once_prune_ratio": 0.05},
    "nad": {"epochs": 2, "te_epochs": 1},
    "nc": {"epochs": 2, "nc_epochs": 2, "batch_size": 64, "ratio": 0.05},  # flags the target here: it unlearns
    "ibau": {"epochs": 2, "batch_size": 128, "K": 2},
}


@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_an_interrupted_defense_resumes_to_the_same_weights_and_rows(name, record_root, monkeypatch):
    def run(result_name, **more):
        return defense.run(
            name,
            result_file="badnet_digits",
            record_root=str(record_root),
            device="cpu",
            result_name=result_name,
            **RESUMABLE[name],
            **more,
        )

    whole = run("whole")
    monkeypatch.setattr(utils.train.Checkpoint, "save", interrupt_after(0))
    with pytest.raises(KeyboardInterrupt):
        run("resumed")
    monkeypatch.setattr(utils.train.Checkpoint, "save", REAL_SAVE)
    resumed = run("resumed", resume=True)
    out = record_root / "badnet_digits" / "defense"
    assert same_weights(
        load_defense_result(out / "whole/defense_result.pt")["model"],
        load_defense_result(out / "resumed/defense_result.pt")["model"],
    )
    assert (out / f"whole/{name}_df.csv").read_text() == (out / f"resumed/{name}_df.csv").read_text()
    assert resumed["after"] == whole["after"] and resumed["config"] == {**whole["config"], "result_name": "resumed"}


def test_anp_restarts_cleanly_on_resume(record_root, monkeypatch):
    kw = {
        "result_file": "badnet_digits",
        "record_root": str(record_root),
        "device": "cpu",
        **defense.DEFENSES.get("anp").smoke_params,
    }
    defense.run("anp", result_name="whole", **kw)
    calls = []

    def interrupted_report(self, epoch, model, **values):
        calls.append(epoch)
        raise KeyboardInterrupt

    monkeypatch.setattr(defense.DefenseData, "report", interrupted_report)
    with pytest.raises(KeyboardInterrupt):
        defense.run("anp", result_name="resumed", **kw)
    assert calls == [0] and not (record_root / "badnet_digits/defense/.resumed.partial").exists()
    monkeypatch.undo()
    defense.run("anp", result_name="resumed", resume=True, **kw)
    out = record_root / "badnet_digits/defense"
    assert same_weights(
        load_defense_result(out / "whole/defense_result.pt")["model"],
        load_defense_result(out / "resumed/defense_result.pt")["model"],
    )


def test_resume_refuses_a_checkpoint_made_with_other_settings(record_root, monkeypatch):
    monkeypatch.setattr(utils.train.Checkpoint, "save", interrupt_after(0))
    with pytest.raises(KeyboardInterrupt):
        defense.run("sau", result_file="badnet_digits", record_root=str(record_root), device="cpu", epochs=2)
    monkeypatch.setattr(utils.train.Checkpoint, "save", REAL_SAVE)
    with pytest.raises(
        UserError,
        match=r"cannot resume from .*checkpoint.pt: it was made with other settings "
        r"\(epochs: checkpoint 2, now 3\); run without --resume to start again$",
    ):
        defense.run(
            "sau", result_file="badnet_digits", record_root=str(record_root), device="cpu", epochs=3, resume=True
        )
    partial = record_root / "badnet_digits/defense/.sau.partial"
    assert checkpoint_epoch(partial / CHECKPOINT_FILE) == 0  # kept
    defense.run(
        "sau",
        result_file="badnet_digits",
        record_root=str(record_root),
        device="cpu",
        epochs=2,
        result_name="sau",
        resume=True,
    )  # naming the default folder (as compare does) is the same run
    with pytest.raises(UserError, match="is complete: there is nothing to resume"):
        defense.run(
            "sau", result_file="badnet_digits", record_root=str(record_root), device="cpu", epochs=2, resume=True
        )
    defense.run(
        "sau",
        result_file="badnet_digits",
        record_root=str(record_root),
        device="cpu",
        epochs=1,
        result_name="fresh",
        resume=True,
    )  # nothing to resume: starts from the beginning


def test_a_stale_checkpoint_is_discarded_by_a_run_without_resume(record_root, monkeypatch, caplog, capsys):
    monkeypatch.setattr(utils.train.Checkpoint, "save", interrupt_after(0))
    with pytest.raises(KeyboardInterrupt):
        defense.run("ft", result_file="badnet_digits", record_root=str(record_root), device="cpu", epochs=2)
    monkeypatch.setattr(utils.train.Checkpoint, "save", REAL_SAVE)
    defense.run("ft", result_file="badnet_digits", record_root=str(record_root), device="cpu", epochs=2)
    assert "discarding the checkpoint of an interrupted run" in caplog.text + capsys.readouterr().err
    assert not (record_root / "badnet_digits/defense/.ft.partial").exists()


def test_ctrl_c_exits_130_with_one_line_that_says_how_to_resume(monkeypatch, capsys, record_root):
    monkeypatch.setattr(utils.train.Checkpoint, "save", interrupt_after(1))
    code, err = command_line(monkeypatch, capsys, "defense/sau.py", *sau_args(record_root, "--epochs", "3"))
    last = err.strip().splitlines()[-1]
    partial = record_root / "badnet_digits" / "defense" / ".sau.partial"
    assert code == 130 and "Traceback" not in err
    assert (
        last == f"interrupted: the checkpoint of epoch 1 is kept in {partial}; run the same command with "
        "--resume to continue"
    )
    assert checkpoint_epoch(partial / CHECKPOINT_FILE) == 1


def test_a_nan_loss_names_epoch_and_batch_and_keeps_the_last_good_checkpoint(monkeypatch, capsys, tmp_path):
    real_epoch = attack.base.train_epoch

    def nan_at_epoch_2(*args, **kw):
        if kw["epoch"] == 2:
            kw["batch_hook"] = lambda x, y: (x * float("nan"), y)
        return real_epoch(*args, **kw)

    monkeypatch.setattr(attack.base, "train_epoch", nan_at_epoch_2)
    code, err = command_line(monkeypatch, capsys, "attack/badnet.py", *badnet_args(tmp_path)[:-2], "--epochs", "4")
    partial = tmp_path / ".badnet_digits.partial"
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: the loss became nan at epoch 2, batch 0; lower the learning rate or check the data; the "
        f"checkpoint of epoch 1 is kept in {partial} (--resume continues from it)"
    )
    assert checkpoint_epoch(partial / CHECKPOINT_FILE) == 1 and not (tmp_path / "badnet_digits").exists()


def test_a_nan_in_sau_stops_at_its_epoch_and_batch(record_root, monkeypatch):
    import defense.sau as sau_module

    real, calls = sau_module.shared_adversarial_risk, []

    def risk(*args):
        calls.append(1)
        value = real(*args)
        return value * float("inf") if len(calls) == 5 else value  # epoch 2, batch 0 (two batches an epoch)

    monkeypatch.setattr(sau_module, "shared_adversarial_risk", risk)
    with pytest.raises(UserError, match=r"the loss became (nan|inf) at epoch 2, batch 0.*checkpoint of epoch 1 is"):
        defense.run("sau", result_file="badnet_digits", record_root=str(record_root), device="cpu", epochs=4)


def test_check_finite_names_what_became_non_finite():
    utils.train.check_finite(torch.ones(3), 0, 0)
    with pytest.raises(UserError, match="the shared adversarial perturbation became inf at epoch 3, batch 7"):
        utils.train.check_finite(torch.tensor([0.0, float("inf")]), 3, 7, "shared adversarial perturbation")


# -- the kill test: SIGKILL mid-epoch, then --resume -----------------------------------------------------


def _kill_after_checkpoints(runs: list[tuple[list[str], Path]], epoch: int) -> None:
    """Start ``python *args`` for every (args, checkpoint) at once; SIGKILL each once its
    checkpoint of ``epoch`` is in place (the next epoch is under way)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "SAUBENCH_NO_PROGRESS": "1"}
    procs = [
        (
            subprocess.Popen(
                [sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            ),
            checkpoint,
        )
        for args, checkpoint in runs
    ]
    try:
        deadline = time.monotonic() + 240
        waiting = list(procs)
        while waiting:
            for proc, checkpoint in list(waiting):
                saved = checkpoint_epoch(checkpoint)
                if saved is not None and saved >= epoch:
                    proc.send_signal(signal.SIGKILL)
                    waiting.remove((proc, checkpoint))
                else:
                    assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stderr.close()
    assert all(proc.returncode == -signal.SIGKILL for proc, _ in procs)


def _no_half_written_file(partial: Path) -> None:
    """What a killed run leaves: its staging folder, whose files are complete (a
    temporary file of a write in progress may sit beside them; the log is appended)."""
    for p in partial.iterdir():
        if p.name == CHECKPOINT_FILE:
            assert torch.load(p, weights_only=True)["format"] == "saubench-checkpoint"
        elif p.name == "index.txt":
            assert all(line.isdigit() for line in p.read_text().splitlines())
        else:
            assert p.name.startswith(".") and p.name.endswith(".tmp") or p.suffix == ".log", p


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(record_root, tmp_path):
    root = tmp_path / "attacks"
    out = record_root / "badnet_digits" / "defense"
    attack_args = [
        "--dataset",
        "digits",
        "--epochs",
        "3",
        "--batch_size",
        "32",
        "--eval_every",
        "3",
        "--device",
        "cpu",
        "--record_root",
        str(root),
        "--save_folder_name",
        "killed",
    ]
    defense_args = list(
        sau_args(record_root, "--epochs", "3", "--batch_size", "64", "--eval_every", "3", "--result_name", "killed")
    )
    _kill_after_checkpoints(
        [
            (["attack/badnet.py", *attack_args], root / ".killed.partial" / CHECKPOINT_FILE),
            (["defense/sau.py", *defense_args], out / ".killed.partial" / CHECKPOINT_FILE),
        ],
        0,
    )
    for final in (root / "killed", out / "killed"):
        assert not final.exists()
        _no_half_written_file(final.parent / ".killed.partial")

    attack.run("badnet", [*attack_args, "--resume"])
    attack.run("badnet", [*attack_args[:-1], "whole"])
    assert same_weights(load_record(root / "whole").model, load_record(root / "killed").model)
    assert (root / "whole/attack_df.csv").read_text() == (root / "killed/attack_df.csv").read_text()
    assert sorted(p.name for p in root.iterdir()) == ["killed", "whole"]

    defense.run("sau", [*defense_args, "--resume"])
    defense.run("sau", [*defense_args[:-1], "whole"])
    assert same_weights(
        load_defense_result(out / "whole/defense_result.pt")["model"],
        load_defense_result(out / "killed/defense_result.pt")["model"],
    )
    assert (out / "whole/sau_df.csv").read_text() == (out / "killed/sau_df.csv").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["killed", "whole"]
