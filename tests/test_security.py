"""Files from strangers (docs/security.md): a record or a dataset folder never runs code,
and nothing the project writes lands outside the record root. Each case is built from
crafted files and run from the command line (a subprocess at the repository root) and
through the Python API.

Code execution: a pickle whose ``__reduce__`` would create a marker file, placed where a
loader could unpickle it (a record's own data_root, ``data/`` beside a BackdoorBench
record, a --data_root the user passes). Writes: symlinks in the record root that lead
elsewhere (a record, a save folder, a record's ``defense/``, the staging, lock and old
folders, compare's output folder and its logs)."""

from __future__ import annotations

import ast
import hashlib
import io
import os
import pickle
import re
import shlex
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import attack
import defense
import bench.compare
from conftest import private_copy
from test_reliability import signed
from utils.errors import UserError
from utils.models import bare_state, create_model
import utils.files
from utils.records import RECORD_FILE, AttackRecord, record_dir
from utils.files import StagedFolder
from utils.poison import PoisonedSet

ROOT = Path(__file__).resolve().parents[1]
HOW = ["cli", "api"]
CIFAR10_FILES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)


# -- helpers ----------------------------------------------------------------------------------------


class Payload:
    """Unpickled, it runs ``touch <marker>``: what a hostile "dataset" file does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def hostile_cifar(folder: Path, marker: Path, names=CIFAR10_FILES) -> Path:
    """``folder`` holding CIFAR batch files that run ``touch marker`` when unpickled."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": Payload(marker), b"labels": [0]}, fh, protocol=2)
    return folder


def cifar_record(folder: Path, config: dict | None = None) -> Path:
    """A small, valid SAU-Bench record on cifar10 (a cnn), with ``config``."""
    model = create_model("cnn", 10, 3, (32, 32), CIFAR_MEAN, CIFAR_STD)
    bd = PoisonedSet(
        torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
        torch.zeros(2, dtype=torch.long),
        torch.ones(2, dtype=torch.long),
        torch.tensor([0, 1]),
    )
    AttackRecord(
        "cnn",
        10,
        model.state_dict(),
        (32, 32, 3),
        "cifar10",
        "badnet",
        {},
        torch.tensor([2]),
        bd,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        config=dict(config or {}),
    ).save(folder)
    return folder


def backdoorbench_cifar_record(folder: Path, name: str) -> Path:
    """A record in BackdoorBench's layout (a dict with NumPy arrays, PNG files) on cifar10."""
    model = create_model("cnn", 10, 3, (32, 32), CIFAR_MEAN, CIFAR_STD)
    save = f"./record/{name}/bd_test_dataset"
    (folder / "bd_test_dataset" / "1").mkdir(parents=True)
    cv2.imwrite(str(folder / "bd_test_dataset" / "1" / "3.png"), np.zeros((32, 32, 3), dtype=np.uint8))
    indicator = np.zeros(10)
    indicator[3] = 1
    bd_test = {
        "bd_data_container": {
            "save_folder_path": save,
            "save_file_format": ".png",
            "data_dict": {3: {"path": f"{save}/1/3.png", "other_info": [0, 1]}},
        },
        "getitem_all": True,
        "getitem_all_switch": False,
        "original_index_array": np.array([3]),
        "poison_indicator": indicator,
        "save_folder_path": save,
    }
    torch.save(
        {
            "model_name": "cnn",
            "num_classes": 10,
            "model": bare_state(model.state_dict()),
            "data_path": "./data/cifar10",
            "img_size": (32, 32, 3),
            "clean_data": "cifar10",
            "bd_train": None,
            "bd_test": bd_test,
        },
        folder / RECORD_FILE,
    )
    return folder


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    # PYTHONPATH: this checkout's packages, not those of an editable install elsewhere
    env = {
        **os.environ,
        "SAUBENCH_NO_PROGRESS": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess, status: int = 2) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == status, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and link under ``folder`` (links not followed) with its content's SHA-256."""
    out = {}
    for parent, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            p = Path(parent) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def sau_cli(record_root: Path, result_file: str, *more: str) -> subprocess.CompletedProcess:
    return cli(
        "defense/sau.py",
        "--result_file",
        result_file,
        "--record_root",
        str(record_root),
        "--device",
        "cpu",
        "--epochs",
        "1",
        *more,
    )


def sau_api(record_root: Path, result_file: str, **more) -> dict:
    return defense.run("sau", result_file=result_file, record_root=str(record_root), device="cpu", epochs=1, **more)


# -- 1. code execution ------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", HOW)
def test_a_record_does_not_choose_the_data_root(tmp_path, monkeypatch, how):
    """record/evil/d/cifar-10-batches-py holds hostile batches and the record's config
    says data_root = record/evil/d: the record's data_root is not used (./data is)."""
    marker = tmp_path / "marker"
    root = tmp_path / "record"
    evil = cifar_record(root / "evil", {"data_root": str(root / "evil" / "d")})
    hostile_cifar(evil / "d" / "cifar-10-batches-py", marker)
    if how == "cli":
        line = one_line_error(sau_cli(root, "evil", "--no-download"))
    else:
        monkeypatch.chdir(tmp_path)  # ./data: tmp_path/data, which does not exist
        with pytest.raises(UserError) as info:
            sau_api(root, "evil", download=False)
        line = str(info.value)
    assert not marker.exists(), "a record's dataset folder ran code"
    assert "cifar10" in line and str(evil / "d") not in line  # ./data was looked in, not the record's
    assert not (evil / "defense").exists()


def test_the_ignored_record_data_root_is_logged(tmp_path):
    import logging

    from defense.base import resolve_config

    root = tmp_path / "record"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    cifar_record(root / "evil", {"data_root": str(theirs)})
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: seen.append(r.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("saubench")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        values, _ = resolve_config("sau", [], {"result_file": "evil", "record_root": str(root)})
        assert values["data_root"] == "data"
        ignored = [m for m in seen if "the record's data_root" in m]
        assert len(ignored) == 1 and f"{str(theirs)!r} is ignored" in ignored[0]
        assert "read from data: pass --data_root DIR" in ignored[0]
        values, _ = resolve_config(
            "sau", [], {"result_file": "evil", "record_root": str(root), "data_root": str(tmp_path)}
        )
        assert values["data_root"] == str(tmp_path)  # a root the user passes is used
        values, _ = resolve_config(
            "sau", [], {"result_file": "evil", "record_root": str(root), "data_root": str(theirs)}
        )
        assert values["data_root"] == str(theirs)  # the record's, when the user passes it
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    assert len([m for m in seen if "the record's data_root" in m]) == 2  # not when it is the one used


@pytest.mark.parametrize("how", HOW)
def test_compare_does_not_pass_the_record_data_root_on(tmp_path, monkeypatch, how):
    marker = tmp_path / "marker"
    root = tmp_path / "record"
    evil = cifar_record(root / "evil", {"data_root": str(root / "evil" / "d")})
    hostile_cifar(evil / "d" / "cifar-10-batches-py", marker)
    args = dict(
        result_file=["evil"],
        defenses=["sau"],
        record_root=str(root),
        device="cpu",
        plots=False,
        option=["download=false", "epochs=1"],
        quiet=True,
    )
    if how == "cli":
        proc = cli(
            "defense/compare.py",
            "--result_file",
            "evil",
            "--defenses",
            "sau",
            "--record_root",
            str(root),
            "--device",
            "cpu",
            "--no-plots",
            "--quiet",
            "--option",
            "download=false",
            "epochs=1",
        )
        assert proc.returncode == 1, proc.stderr[-2000:]  # the run failed: no data in ./data
        assert "failed" in proc.stdout
    else:
        monkeypatch.chdir(tmp_path)
        result = bench.compare.run(**args)
        assert result["failed"] == 1
    assert not marker.exists(), "compare passed the record's data_root on"
    log = (root / "compare" / "evil" / "logs" / "evil" / "sau.log").read_text()
    assert "cifar10" in log and str(evil / "d") not in log


@pytest.mark.parametrize("how", HOW)
def test_a_backdoorbench_record_does_not_read_data_beside_it(tmp_path, monkeypatch, how):
    """BackdoorBench's reader used data/ beside the record/ folder: tmp/data is hostile."""
    marker = tmp_path / "marker"
    root = tmp_path / "record"
    backdoorbench_cifar_record(root / "bb", "bb")
    hostile_cifar(tmp_path / "data" / "cifar-10-batches-py", marker)
    if how == "cli":
        line = one_line_error(sau_cli(root, "bb", "--no-download"))
    else:
        elsewhere = tmp_path / "cwd"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        with pytest.raises(UserError) as info:
            sau_api(root, "bb", download=False)
        line = str(info.value)
    assert not marker.exists(), "data/ beside a BackdoorBench record ran code"
    assert str(tmp_path / "data") not in line


@pytest.mark.parametrize("how,dataset", [("cli", "cifar10"), ("api", "cifar10"), ("api", "cifar100")])
def test_a_hostile_dataset_folder_passed_as_data_root_runs_nothing(tmp_path, how, dataset):
    marker = tmp_path / "marker"
    root = tmp_path / "record"
    cifar_record(root / "rec")
    if dataset == "cifar100":
        record = torch.load(root / "rec" / RECORD_FILE, weights_only=True)
        record["clean_data"] = "cifar100"
        torch.save(signed(record), root / "rec" / RECORD_FILE)  # 10 classes: refused later, if it ever got there
        folder = hostile_cifar(tmp_path / "data" / "cifar-100-python", marker, ["train", "test"])
    else:
        folder = hostile_cifar(tmp_path / "data" / "cifar-10-batches-py", marker)
    data_root = tmp_path / "data"
    if how == "cli":
        line = one_line_error(sau_cli(root, "rec", "--data_root", str(data_root), "--no-download"))
    else:
        with pytest.raises(UserError) as info:
            sau_api(root, "rec", data_root=str(data_root), download=False)
        line = str(info.value)
    assert not marker.exists(), "a dataset file ran code"
    first = "train" if dataset == "cifar100" else "data_batch_1"
    assert f"{folder / first}: not a CIFAR batch file (it names posix.system" in line
    assert "\n" not in line


def _batch_bytes(numpy1: bool) -> bytes:
    """A CIFAR batch as the real files are written: protocol 2, bytes keys, a uint8 array."""
    rng = np.random.default_rng(0)
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"labels": [3, 1],
        b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8),
        b"filenames": [b"a.png", b"b.png"],
    }
    raw = pickle.dumps(batch, protocol=2)
    return raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray") if numpy1 else raw


@pytest.mark.parametrize("numpy1", [False, True])
def test_real_cifar_batches_still_load(tmp_path, numpy1):
    from utils.datasets import _unpickle

    path = tmp_path / "data_batch_1"
    path.write_bytes(_batch_bytes(numpy1))
    batch = _unpickle(path)
    assert batch[b"labels"] == [3, 1] and batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (2, 3072)
    assert batch[b"filenames"] == [b"a.png", b"b.png"]


@pytest.mark.parametrize(
    "payload",
    [(os.system, ("true",)), (eval, ("1",)), (getattr, ("", "join")), (np.load, ("x",)), (io.BytesIO, (b"",))],
)
def test_the_cifar_unpickler_refuses_every_other_callable(tmp_path, payload):
    from utils.datasets import _unpickle

    class Reduces:
        def __reduce__(self):
            return payload

    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": Reduces()}, protocol=2))
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: not a CIFAR batch file \(it names "):
        _unpickle(path)
    codecs = pickle.dumps({b"data": b"x"}, protocol=2).replace(b"latin1", b"rot_13")
    path.write_bytes(codecs)  # _codecs.encode is allowed for latin-1 only
    with pytest.raises(UserError, match=r"not a CIFAR batch file \(it calls _codecs.encode with 'rot_13'"):
        _unpickle(path)


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def test_no_loader_unpickles_outside_the_gated_places():
    """Every pickle-capable loader in the project's code, found by parsing it: nothing
    calls pickle.load(s) (or marshal, dill, joblib, shelve); the one pickle.Unpickler is
    CifarUnpickler, which overrides find_class; torch.load runs with weights_only=True
    except once, behind --trust_record (utils/records.py); np.load never with
    allow_pickle."""
    problems, unpickling_torch, unpicklers = [], [], []
    for path in sorted(ROOT.glob("**/*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "build", "venv", ".venv") or any(p.startswith(".") for p in rel.parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            where = f"{rel}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.ClassDef) and any(_dotted(b).endswith("Unpickler") for b in node.bases):
                unpicklers.append(
                    (
                        str(rel),
                        node.name,
                        any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body),
                    )
                )
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if name in (
                "pickle.load",
                "pickle.loads",
                "pickle.Unpickler",
                "marshal.load",
                "marshal.loads",
                "dill.load",
                "dill.loads",
                "joblib.load",
                "shelve.open",
                "pd.read_pickle",
            ):
                problems.append(f"{where}: {name}")
            if "allow_pickle" in keywords and not (
                isinstance(keywords["allow_pickle"], ast.Constant) and keywords["allow_pickle"].value is False
            ):
                problems.append(f"{where}: {name}(allow_pickle=...)")
            if name == "torch.load":
                safe = keywords.get("weights_only")
                if not (isinstance(safe, ast.Constant) and safe.value is True):
                    unpickling_torch.append(where)
    assert problems == []
    assert unpicklers == [("utils/datasets.py", "CifarUnpickler", True)]
    assert len(unpickling_torch) == 1 and unpickling_torch[0].startswith("utils/records.py:"), unpickling_torch


# -- YAML and grid files: they do not choose where runs read and write, nor trust ----------------------------


@pytest.mark.parametrize(
    "how,kind,key",
    [
        ("cli", "defense", "data_root"),
        *(("api", "defense", key) for key in ("data_root", "record_root", "trust_record")),
        *(("api", "attack", key) for key in ("data_root", "record_root")),
    ],
)
def test_a_yaml_file_cannot_choose_the_data_or_record_root(digits_record_root, tmp_path, elsewhere, how, kind, key):
    yaml_file = tmp_path / "x.yaml"
    yaml_file.write_text(f"{key}: {'true' if key == 'trust_record' else elsewhere}\n")
    root = digits_record_root
    if kind == "defense":
        args = [
            "defense/sau.py",
            "--result_file",
            "badnet_digits",
            "--record_root",
            str(root),
            "--yaml_path",
            str(yaml_file),
            "--device",
            "cpu",
        ]

        def api():
            return defense.run(
                "sau", result_file="badnet_digits", record_root=str(root), yaml_path=str(yaml_file), device="cpu"
            )
    else:
        root = tmp_path / "record"
        args = []

        def api():
            return attack.run(
                "badnet",
                dataset="digits",
                epochs=1,
                record_root=str(root),
                bd_yaml_path=str(yaml_file),
                device="cpu",
            )

    if how == "cli":
        line = one_line_error(cli(*args))
    else:
        with pytest.raises(UserError) as info:
            api()
        line = str(info.value)
    assert (
        f"x.yaml: '{key}' can be given only on the command line (or as a keyword argument), not in a YAML file" in line
    )
    assert list(elsewhere.iterdir()) == []
    if kind == "attack":
        assert not root.exists()


@pytest.mark.parametrize(
    "how,where,key",
    [
        ("cli", "defense_options", "trust_record"),
        *(
            ("api", where, key)
            for where in ("attack_options", "defense_options", "defenses")
            for key in ("data_root", "record_root", "trust_record")
        ),
    ],
)
def test_a_grid_file_cannot_choose_the_data_or_record_root_nor_trust(tmp_path, elsewhere, how, where, key):
    value = "true" if key == "trust_record" else str(elsewhere)
    defenses = f"defenses: {{ft: {{{key}: {value}}}}}" if where == "defenses" else "defenses: [ft]"
    options = "" if where == "defenses" else f"{where}: {{{key}: {value}}}\n"
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"datasets: [digits]\nattacks: [badnet]\n{options}{defenses}\n")
    root = tmp_path / "record"
    if how == "cli":
        line = one_line_error(
            cli("defense/compare.py", "--grid", str(grid), "--record_root", str(root), "--table_only")
        )
    else:
        with pytest.raises(UserError) as info:
            bench.compare.run(grid=str(grid), record_root=str(root), table_only=True)
        line = str(info.value)
    assert (
        f"grid.yaml: '{key}' can be given only on the command line (or as a keyword argument), not in a grid "
        "file" in line
    )
    assert not root.exists() and list(elsewhere.iterdir()) == []


def test_a_record_does_not_choose_its_yaml_file(tmp_path):
    from utils.config import CONFIG_DIR, method_yaml

    assert method_yaml("defense", "sau", "digits") == CONFIG_DIR / "defense" / "sau" / "digits.yaml"
    planted = tmp_path / "planted.yaml"
    planted.write_text("epochs: 1\n")
    sneaky = os.path.relpath(tmp_path / "planted", CONFIG_DIR / "defense" / "sau")
    assert (CONFIG_DIR / "defense" / "sau" / f"{sneaky}.yaml").resolve() == planted.resolve()
    found = method_yaml("defense", "sau", sneaky)  # a record's clean_data '../../..': not looked up
    assert found is None or found.resolve() != planted.resolve()


# -- 2. writes outside the record root ---------------------------------------------------------------------


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("how", HOW)
def test_a_record_that_is_a_symlink_out_of_the_root_is_not_written_to(digits_record_root, tmp_path, elsewhere, how):
    """ln -s /elsewhere record/link; defense/sau.py --result_file link."""
    root = private_copy(digits_record_root, tmp_path)
    target = elsewhere / "rec"
    target.mkdir()
    (target / RECORD_FILE).write_bytes((root / "badnet_digits" / RECORD_FILE).read_bytes())
    (root / "link").symlink_to(target)
    before = snapshot(elsewhere)
    if how == "cli":
        line = one_line_error(sau_cli(root, "link"))
    else:
        with pytest.raises(UserError) as info:
            sau_api(root, "link")
        line = str(info.value)
    assert f"{root / 'link'} leads outside the record root {root}" in line
    assert snapshot(elsewhere) == before and not (target / "defense").exists()


def test_a_symlink_that_stays_inside_the_root_is_allowed(record_root):
    (record_root / "alias").symlink_to(record_root / "badnet_digits")
    summary = sau_api(record_root, "alias", ratio=0.1)
    assert summary["defense"] == "sau"
    assert (record_root / "badnet_digits" / "defense" / "sau" / "summary.json").is_file()


@pytest.mark.parametrize("how", HOW)
def test_an_attack_cannot_plant_a_record_through_a_symlink(tmp_path, elsewhere, how):
    """--save_folder_name linkroot/planted with record/linkroot -> /elsewhere."""
    root = tmp_path / "record"
    root.mkdir()
    (root / "linkroot").symlink_to(elsewhere)
    if how == "cli":
        line = one_line_error(
            cli(
                "attack/badnet.py",
                "--dataset",
                "digits",
                "--epochs",
                "1",
                "--record_root",
                str(root),
                "--save_folder_name",
                "linkroot/planted",
                "--device",
                "cpu",
            )
        )
    else:
        with pytest.raises(UserError) as info:
            attack.run(
                "badnet",
                dataset="digits",
                epochs=1,
                record_root=str(root),
                save_folder_name="linkroot/planted",
                device="cpu",
            )
        line = str(info.value)
    assert "linkroot/planted leads outside the record root" in line
    assert list(elsewhere.iterdir()) == []


STAGING_LINKS = ["defense", "defense/.sau.partial", "defense/.sau.lock", "defense/.sau.old", "defense/sau"]


@pytest.mark.parametrize("how,link", [("cli", "defense"), *(("api", link) for link in STAGING_LINKS)])
def test_a_symlinked_result_or_staging_folder_is_refused(record_root, elsewhere, how, link):
    record = record_root / "badnet_digits"
    if link != "defense":
        (record / "defense").mkdir()
    target = elsewhere / "target"
    target.mkdir()
    (target / "checkpoint.pt").write_bytes(b"planted")
    (record / link).symlink_to(target)
    before = snapshot(elsewhere)
    more = ("--resume", "--overwrite") if link.endswith("partial") else ("--overwrite",)
    if how == "cli":
        line = one_line_error(sau_cli(record_root, "badnet_digits", "--ratio", "0.1", *more))
    else:
        with pytest.raises(UserError) as info:
            sau_api(record_root, "badnet_digits", ratio=0.1, resume=link.endswith("partial"), overwrite=True)
        line = str(info.value)
    assert "leads outside the record root" in line and str(target) in line
    assert snapshot(elsewhere) == before


def test_a_resumed_staging_folder_with_a_link_out_is_refused(record_root, elsewhere):
    staging = record_root / "badnet_digits" / "defense" / ".sau.partial"
    staging.mkdir(parents=True)
    (staging / "checkpoint.pt").write_bytes(b"x")
    (staging / "trigger").symlink_to(elsewhere)
    staged = StagedFolder(record_root / "badnet_digits" / "defense" / "sau", root=record_root)
    with pytest.raises(UserError, match="trigger leads outside the record root"):
        staged.open(resume=True)
    assert not staged.lock.exists()  # given back


COMPARE_LINKS = ["compare", "compare/mine", "compare/mine/logs", "compare/mine/logs/badnet_digits"]


@pytest.mark.parametrize("how,link", [("cli", "compare"), *(("api", link) for link in COMPARE_LINKS)])
def test_compare_outputs_and_logs_stay_inside_the_root(record_root, elsewhere, how, link):
    parent = (record_root / link).parent
    parent.mkdir(parents=True, exist_ok=True)
    (record_root / link).symlink_to(elsewhere)
    before = snapshot(elsewhere)
    if how == "cli":
        line = one_line_error(
            cli(
                "defense/compare.py",
                "--result_file",
                "badnet_digits",
                "--defenses",
                "sau",
                "--record_root",
                str(record_root),
                "--name",
                "mine",
                "--table_only",
                "--no-plots",
            )
        )
    else:
        with pytest.raises(UserError) as info:
            bench.compare.run(
                result_file=["badnet_digits"],
                defenses=["sau"],
                record_root=str(record_root),
                name="mine",
                table_only=True,
                plots=False,
            )
        line = str(info.value)
    assert "leads outside the record root" in line
    assert snapshot(elsewhere) == before


def test_inside_root(tmp_path, elsewhere):
    inside_root = utils.files.inside_root
    root = tmp_path / "record"
    (root / "a").mkdir(parents=True)
    (root / "in").symlink_to(root / "a")
    (root / "out").symlink_to(elsewhere)
    assert inside_root(root, root / "in" / "x" / "y") == root / "in" / "x" / "y"  # not created
    assert not (root / "a" / "x").exists()
    with pytest.raises(UserError, match="leads outside the record root"):
        inside_root(root, root / "out" / "x")
    with pytest.raises(UserError, match="leads outside the record root"):
        record_dir(root, "out")
    linked = tmp_path / "linked_root"
    linked.symlink_to(root)  # the root itself may be a symlink
    assert record_dir(linked, "a") == linked / "a"
