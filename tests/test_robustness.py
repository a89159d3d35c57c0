"""Hostile input and a hostile machine (issue 17, items 6-8): YAML that expands or repeats
keys, values that overflow torch, record roots that are files, full or read-only disks,
templates that reach into objects, Ctrl-C while torch loads, SIGTERM, records whose
model is broken before the defense starts, and messages that must not mislead. Each is
one line and exit status 2 (130/143 for interrupts) with nothing half-written."""

from __future__ import annotations

import ast
import errno
import math
import os
import pathlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import attack
import defense
import utils.train
from bench import compare
from bench.grid import _parse_options
from test_reliability import (
    REAL_SAVE,
    badnet_args,
    command_line,
    interrupt_after,
    refused,
    sau_args,
    snapshot,
    write_raw,
)
from utils import config as cfg
from utils.errors import UserError
from utils.records import RECORD_FILE, checkpoint_epoch, load_record
from utils.files import CHECKPOINT_FILE

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SAUBENCH_NO_PROGRESS": "1"}


# -- YAML: no aliases, no duplicate keys; messages bounded ----------------------------------------------

BOMB = """a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
epochs: [*d, *d, *d, *d, *d, *d, *d, *d, *d]
"""


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    with pytest.raises(UserError, match=r"bomb.yaml: YAML anchors \(&a\) are not allowed in config files$"):
        cfg.read_yaml(path)
    path.write_text("epochs: *nothing\n")
    with pytest.raises(UserError, match=r"YAML aliases \(\*nothing\) are not allowed in config files$"):
        cfg.read_yaml(path)


def test_a_yaml_alias_bomb_in_a_defense_yaml_is_one_line(monkeypatch, capsys, record_root, tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    line = refused(monkeypatch, capsys, record_root, "defense/sau.py", *sau_args(record_root, "--yaml_path", str(path)))
    assert line == f"error: {path}: YAML anchors (&a) are not allowed in config files"


def test_duplicate_yaml_keys_are_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("epochs: 1\nlr: 0.1\nepochs: 2\n")
    with pytest.raises(UserError, match=r"dup.yaml: duplicate key 'epochs' \(line 3\)$"):
        cfg.read_yaml(path)
    path.write_text("sau:\n  lr: 1\n  lr: 2\n")  # nested mappings too
    with pytest.raises(UserError, match=r"duplicate key 'lr' \(line 3\)"):
        cfg.read_yaml(path)


def test_grid_files_and_options_refuse_aliases_too(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("datasets: &d [digits]\nattacks: {badnet: {}}\ndefenses: {ft: {}}\nmodels: *d\n")
    with pytest.raises(UserError, match="YAML anchors"):
        compare.load_grid(grid, compare.resolve([], {"grid": "x"}))
    with pytest.raises(UserError, match=r"--option .*YAML anchors"):
        _parse_options(["lr=&a [1]"], ["ft"])


class _Counted:
    calls = 0

    def __repr__(self) -> str:
        type(self).calls += 1
        return "c"


def test_brief_never_walks_a_whole_structure():
    _Counted.calls = 0
    shared = [_Counted()] * 1000
    text = cfg.brief([shared] * 1000)
    assert len(text) <= 80 and _Counted.calls <= 50
    assert cfg.brief(10**5000).startswith("<an integer of")  # str() of it would raise ValueError
    assert cfg.brief("x" * 10**6).endswith("...") and len(cfg.brief("x" * 10**6)) == 80
    assert cfg.brief("ten") == "'ten'" and cfg.brief(1.5) == "1.5" and cfg.brief([1, 2]) == "[1, 2]"


def test_a_wrong_type_built_from_a_huge_value_gives_a_short_message():
    params = [cfg.Param("epochs", int, 1)]
    start = time.perf_counter()
    with pytest.raises(UserError) as info:
        cfg.resolve(params, [cfg.Layer("x.yaml", {"epochs": [list(range(100))] * 100000})])
    assert len(str(info.value)) < 200 and time.perf_counter() - start < 1


# -- floats that overflow torch ----------------------------------------------------------------------------


def test_floats_beyond_float32_are_refused_in_the_parameter_machinery():
    params = [cfg.Param("lr", float, 0.1), cfg.Param("betas", list[float], [0.9])]
    with pytest.raises(UserError, match=r"^command line: 'lr' must be within float32's range .*got 1e\+308$"):
        cfg.resolve(params, [], {"lr": 1e308})
    with pytest.raises(UserError, match="'betas' must be within float32's range"):
        cfg.resolve(params, [cfg.Layer("x.yaml", {"betas": [0.5, -1e39]})])
    assert cfg.resolve(params, [], {"lr": 3e38})["lr"] == 3e38


@pytest.mark.parametrize(
    "script,args",
    [
        ("defense/sau.py", ("--trigger_norm", "1e308")),
        ("defense/sau.py", ("--lr", "1e308")),
    ],
)
def test_overflowing_defense_floats_are_one_line(monkeypatch, capsys, record_root, script, args):
    line = refused(monkeypatch, capsys, record_root, script, *sau_args(record_root, *args))
    assert "must be within float32's range" in line


def test_an_overflowing_attack_lr_is_one_line(monkeypatch, capsys, tmp_path):
    line = refused(monkeypatch, capsys, tmp_path, "attack/badnet.py", *badnet_args(tmp_path, "--lr", "1e308"))
    assert (
        line == "error: command line: 'lr' must be within float32's range (at most 3.403e+38 in magnitude), got 1e+308"
    )


# -- record roots that are files, full and read-only disks -----------------------------------------------


def test_a_record_root_that_is_a_file_or_below_one(monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    line = refused(monkeypatch, capsys, tmp_path, "attack/badnet.py", *badnet_args(blocker))
    assert line == f"error: --record_root {blocker} is a file, not a folder"
    line = refused(monkeypatch, capsys, tmp_path, "attack/badnet.py", *badnet_args(blocker / "sub"))
    assert line == f"error: --record_root {blocker / 'sub'} is below {blocker}, which is a file, not a folder"
    line = refused(monkeypatch, capsys, tmp_path, "defense/sau.py", *sau_args(blocker / "sub"))
    assert "which is a file, not a folder" in line


def test_a_read_only_record_root_is_one_line_and_leaves_no_folder(monkeypatch, capsys, tmp_path):
    root = tmp_path / "readonly"
    root.mkdir()
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kw):  # tests run as root, whom chmod does not stop
        if str(self).startswith(str(root)) and self != root:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kw)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    line = refused(monkeypatch, capsys, tmp_path, "attack/badnet.py", *badnet_args(root / "deep" / "er"))
    assert line == f"error: cannot write {root / 'deep' / 'er'}: Read-only file system"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["readonly"]


def _full_disk_after(saves: int):
    """A torch.save that writes ``saves`` files, then finds the disk full."""
    real_save = torch.save
    count = []

    def save(obj, f, *args, **kw):
        if len(count) >= saves:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        count.append(1)
        return real_save(obj, f, *args, **kw)

    return save


def test_a_full_disk_before_the_first_checkpoint_is_one_line_and_leaves_nothing(monkeypatch, capsys, record_root):
    monkeypatch.setattr(torch, "save", _full_disk_after(0))
    before = snapshot(record_root)
    code, err = command_line(monkeypatch, capsys, "defense/sau.py", *sau_args(record_root, "--epochs", "2"))
    partial = record_root / "badnet_digits" / "defense" / ".sau.partial"
    line = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err and snapshot(record_root) == before
    assert line == f"error: cannot write {partial / CHECKPOINT_FILE}: No space left on device"
    assert not (record_root / "badnet_digits" / "defense").exists()  # no empty folder left behind


def test_a_full_disk_after_a_checkpoint_keeps_it(monkeypatch, capsys, record_root):
    monkeypatch.setattr(torch, "save", _full_disk_after(1))
    code, err = command_line(monkeypatch, capsys, "defense/sau.py", *sau_args(record_root, "--epochs", "3"))
    partial = record_root / "badnet_digits" / "defense" / ".sau.partial"
    assert (
        code == 2
        and "Traceback" not in err
        and err.strip().splitlines()[-1:]
        == [
            f"error: cannot write {partial / CHECKPOINT_FILE}: No space left on device; the checkpoint of epoch 0 is "
            f"kept in {partial} (--resume continues from it)"
        ]
    )
    assert checkpoint_epoch(partial / CHECKPOINT_FILE) == 0 and not list(partial.glob(".*.tmp"))


# -- grid templates ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    ["{dataset.__class__}", "{attack.__init__.__globals__}", "{attack[0]}", "{attack!r}", "{attack:>999999999}", "{0}"],
)
def test_a_grid_record_name_takes_plain_fields_only(tmp_path, template):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"datasets: [digits]\nattacks: {{badnet: {{}}}}\ndefenses: {{ft: {{}}}}\nrecord_name: '{template}'\n"
    )
    with pytest.raises(
        UserError,
        match=r"'record_name' .*is not one of the plain fields \{attack\}, \{dataset\}, "
        r"\{model\}$",
    ):
        compare.load_grid(grid, compare.resolve([], {"grid": "x"}))


def test_fill_template():
    assert cfg.fill_template("{attack}_{dataset}{model}", {"attack": "a", "dataset": "d", "model": ""}) == "a_d"
    assert cfg.fill_template("{{x}}_{attack}", {"attack": "a"}) == "{x}_a"
    with pytest.raises(ValueError):
        cfg.fill_template("{", {})


# -- Ctrl-C while torch loads, SIGTERM ----------------------------------------------------------------------

CTRL_C_AT_IMPORT = """
import runpy, sys
class CtrlC:  # Ctrl-C pressed while the script imports torch
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
sys.meta_path.insert(0, CtrlC())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script", ["defense/sau.py", "attack/badnet.py"])
def test_ctrl_c_while_an_entry_script_imports_torch_is_one_line_and_130(script):
    done = subprocess.run(
        [sys.executable, "-c", CTRL_C_AT_IMPORT, str(ROOT / script), "--help"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 130 and done.stderr == "interrupted: no result was written\n", done.stderr


def test_every_entry_script_loads_the_boot_module_before_torch():
    scripts = [
        p
        for p in [*ROOT.glob("attack/*.py"), *ROOT.glob("defense/*.py")]
        if 'if __name__ == "__main__"' in p.read_text()
    ]
    assert len(scripts) >= 10
    for path in scripts:
        imports = [node for node in ast.parse(path.read_text()).body if isinstance(node, (ast.Import, ast.ImportFrom))]
        first = next(node for node in imports if getattr(node, "module", None) != "__future__")
        assert isinstance(first, ast.Import) and first.names[0].name == "utils.boot", path


SIGTERM_AFTER_CHECKPOINT = """
import os, signal, sys
import defense, utils.train
real = utils.train.Checkpoint.save
def save(self, epoch, **extra):
    real(self, epoch, **extra)
    if epoch == 0:
        os.kill(os.getpid(), signal.SIGTERM)
utils.train.Checkpoint.save = save
sys.argv = ["defense/sau.py", *sys.argv[1:]]
defense.main("sau")
"""


def test_sigterm_keeps_the_checkpoint_like_ctrl_c_and_exits_143(record_root):
    done = subprocess.run(
        [sys.executable, "-c", SIGTERM_AFTER_CHECKPOINT, *sau_args(record_root, "--epochs", "2")],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    partial = record_root / "badnet_digits" / "defense" / ".sau.partial"
    assert done.returncode == 143, done.stderr
    assert (
        done.stderr.strip().splitlines()[-1] == f"interrupted: the checkpoint of epoch 0 is kept in {partial}; "
        "run the same command with --resume to continue"
    )
    assert checkpoint_epoch(partial / CHECKPOINT_FILE) == 0 and not (record_root / ".sau.lock").exists()


def test_sigterm_waits_for_a_checkpoint_being_written():
    from utils.runtime import Terminated, deferred_interrupts, raise_terminated

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        written = []
        with pytest.raises(Terminated):
            with deferred_interrupts():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                written.append(1)
        assert written == [1]
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- messages that must not mislead ------------------------------------------------------------------------


class _System:
    def __reduce__(self):
        return (os.system, ("true",))


def test_a_record_holding_a_blocked_global_is_not_called_truncated(monkeypatch, capsys, record_root):
    write_raw(record_root, "evil", {"format": "x", "payload": _System()})
    for trust in ((), ("--trust_record",)):
        line = refused(
            monkeypatch,
            capsys,
            record_root,
            "defense/sau.py",
            "--result_file",
            "evil",
            "--record_root",
            str(record_root),
            "--device",
            "cpu",
            *trust,
        )
        assert "not a complete torch file" not in line
        assert f"{record_root / 'evil' / RECORD_FILE}: this attack record holds a reference to " in line
        assert "blocks" in line and "the file is refused" in line and "--trust_record" not in line


def _record_with(record_root: Path, name: str, change) -> None:
    record = load_record(record_root / "badnet_digits")
    change(record)
    (record_root / name).mkdir()
    record.save(record_root / name)


def test_nan_weights_in_a_record_are_blamed_on_the_record(monkeypatch, capsys, record_root):
    def poison(record):
        key = next(k for k, v in record.model.items() if v.is_floating_point())
        record.model[key] = record.model[key].clone().fill_(math.nan)

    _record_with(record_root, "nan", poison)
    line = refused(
        monkeypatch,
        capsys,
        record_root,
        "defense/sau.py",
        *sau_args(record_root, "--epochs", "1")[2:],
        "--result_file",
        "nan",
    )
    assert "the record's weights hold NaN/inf" in line and "learning rate" not in line


def test_a_zero_std_in_a_record_is_not_blamed_on_the_learning_rate(monkeypatch, capsys, record_root):
    def zero_std(record):
        record.std = tuple(0.0 for _ in record.std)

    _record_with(record_root, "std0", zero_std)
    line = refused(
        monkeypatch,
        capsys,
        record_root,
        "defense/sau.py",
        *sau_args(record_root, "--epochs", "1")[2:],
        "--result_file",
        "std0",
    )
    assert "std" in line and "learning rate" not in line


def test_resume_from_an_unreadable_checkpoint_says_it_was_removed(monkeypatch, capsys, record_root):
    partial = record_root / "badnet_digits" / "defense" / ".sau.partial"
    partial.mkdir(parents=True)
    (partial / CHECKPOINT_FILE).write_bytes(b"PK\x03\x04 not a whole zip")
    code, err = command_line(monkeypatch, capsys, "defense/sau.py", *sau_args(record_root, "--epochs", "1", "--resume"))
    assert code == 2 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ")
    assert f"{partial / CHECKPOINT_FILE}: cannot read this checkpoint" in err
    assert f"it was removed with {partial}, so the next run starts from the beginning" in err
    assert not partial.exists()


def test_a_resumed_run_counts_the_seconds_of_every_part(record_root, tmp_path, monkeypatch):
    monkeypatch.setattr(utils.train.Checkpoint, "save", interrupt_after(1))
    with pytest.raises(KeyboardInterrupt):
        defense.run("sau", result_file="badnet_digits", record_root=str(record_root), device="cpu", epochs=2)
    partial = record_root / "badnet_digits" / "defense" / ".sau.partial"
    first = torch.load(partial / CHECKPOINT_FILE, weights_only=True)["seconds"]
    monkeypatch.setattr(utils.train.Checkpoint, "save", REAL_SAVE)
    summary = defense.run(
        "sau", result_file="badnet_digits", record_root=str(record_root), device="cpu", epochs=2, resume=True
    )  # nothing left to train: this part alone takes no time
    assert first > 0 and summary["seconds"] >= round(first, 2)

    kw = {
        "dataset": "digits",
        "record_root": str(tmp_path),
        "device": "cpu",
        "epochs": 2,
        "save_folder_name": "resumed",
    }
    monkeypatch.setattr(utils.train.Checkpoint, "save", interrupt_after(1))
    with pytest.raises(KeyboardInterrupt):
        attack.run("badnet", **kw)
    first = torch.load(tmp_path / ".resumed.partial" / CHECKPOINT_FILE, weights_only=True)["seconds"]
    monkeypatch.setattr(utils.train.Checkpoint, "save", REAL_SAVE)
    summary = attack.run("badnet", resume=True, **kw)
    assert first > 0 and summary["seconds"] >= round(first, 2)


def test_a_refused_run_changes_nothing_it_did_not_create(monkeypatch, capsys, record_root):
    """The snapshot helper sees hidden files too: a refused run leaves no lock behind."""
    before = snapshot(record_root)
    refused(monkeypatch, capsys, record_root, "defense/sau.py", *sau_args(record_root, "--lr", "1e39"))
    assert snapshot(record_root) == before and not list(record_root.rglob(".*.lock"))


def test_a_full_disk_under_the_run_log_prints_no_logging_traceback(tmp_path, capsys):
    from utils.runtime import log_to

    with log_to(tmp_path, "run.log") as log:
        handler = next(h for h in log.handlers if isinstance(h, __import__("logging").FileHandler))
        handler.stream.close()
        handler.stream = open("/dev/full", "w", encoding="utf-8")  # every write: ENOSPC
        log.info("a line the file cannot take")
    err = capsys.readouterr().err
    assert "a line the file cannot take" in err and "Traceback" not in err and "Logging error" not in err


def test_a_float_that_overflows_inside_torch_is_one_line(monkeypatch, capsys, record_root):
    # 3e38 is within float32's range, but Adam's step lr / (1 - beta_1) is not
    code, err = command_line(
        monkeypatch, capsys, "defense/sau.py", *sau_args(record_root, "--epochs", "1", "--lr", "3e38")
    )
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: a value overflowed float32 inside torch during the run")
    assert not (record_root / "badnet_digits" / "defense").exists()


def test_a_full_disk_during_an_attack_removes_the_folders_the_run_made(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch, "save", _full_disk_after(0))
    root = tmp_path / "new" / "records"
    code, err = command_line(monkeypatch, capsys, "attack/badnet.py", *badnet_args(root))
    assert code == 2 and "Traceback" not in err
    assert (
        err.strip().splitlines()[-1]
        == f"error: cannot write {root / '.badnet_digits.partial' / CHECKPOINT_FILE}: No space left on device"
    )
    assert list(tmp_path.iterdir()) == []  # record/, new/ and the staging folder: all gone
