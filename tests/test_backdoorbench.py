"""BackdoorBench interoperability (utils/backdoorbench.py): its state_dicts load into our
architectures of the same name and compute the same function; a record in its exact
on-disk layout (a pickled dict with NumPy arrays, PNG folders, DataParallel's "module."
prefixes) reads back as our typed record and every defense runs on it from the command
line; --export_backdoorbench writes that layout; our results sit beside its own, with its
file names and columns; defense/compare.py lists its results next to ours."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from PIL import Image
from torch import nn
from torchvision.transforms import Resize

import attack
import defense
from conftest import private_copy
from utils.backdoorbench import NORMALIZATION, defense_results
from utils.errors import UserError
from utils.history import History
from utils.models import classifier_state, create_model, load_weights
from utils.records import RECORD_FILE, load_defense_result, load_record

ROOT = Path(__file__).resolve().parents[1]
BB_COLUMNS = [
    "",
    "epoch",
    "clean_test_loss_avg_over_batch",
    "bd_test_loss_avg_over_batch",
    "ra_test_loss_avg_over_batch",
    "test_acc",
    "test_asr",
    "test_ra",
]


# -- architectures: BackdoorBench's key layout, the same function -----------------------------------------


class RefPreActBlock(nn.Module):
    """BackdoorBench's PreActBlock (models/preact_resnet.py), rewritten for this test."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.ind = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        short = self.shortcut(out) if hasattr(self, "shortcut") else x
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + short


class RefPreActResNet18(nn.Module):
    """BackdoorBench's PreActResNet18: conv1, layer1..4 (two blocks each), AdaptiveAvgPool, linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        cin, layers = 64, []
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(RefPreActBlock(cin, width, stride), RefPreActBlock(width, width, 1)))
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(self.avgpool(out).view(out.size(0), -1))


def bb_reference(name: str) -> nn.Module:
    """The module BackdoorBench's generate_cls_model builds for ``name`` (10 classes)."""
    if name == "preactresnet18":
        return RefPreActResNet18(10)
    if name == "vit_b_16":  # BackdoorBench: Sequential(Resize((224, 224)), vit) with a new head
        return nn.Sequential(Resize((224, 224)), tvm.vit_b_16(num_classes=10))
    return getattr(tvm, name)(num_classes=10)


@pytest.mark.parametrize(
    "name", ["preactresnet18", "resnet18", "mobilenet_v3_large", "vgg19_bn", "convnext_tiny", "vit_b_16"]
)
def test_backdoorbench_weights_load_without_missing_keys_and_compute_the_same(name):
    torch.manual_seed(0)
    ref = bb_reference(name).eval()
    for m in ref.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    saved = {f"module.{k}": v for k, v in ref.state_dict().items()}  # as trained under DataParallel
    mean, std = NORMALIZATION["cifar10"]
    ours = load_weights(create_model(name, 10, 3, (32, 32), mean, std), classifier_state(saved), "test").eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = ref((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
        assert torch.allclose(ours(x), expected, atol=1e-4, rtol=1e-4)


def test_normalization_matches_our_datasets_where_both_know_it():
    from utils.datasets import dataset_info

    for name in ("cifar10", "cifar100", "mnist", "gtsrb", "tiny"):
        info = dataset_info(name)
        assert NORMALIZATION[name] == (info.mean, info.std), name


# -- a record in BackdoorBench's exact layout --------------------------------------------------------------


def _png(image: torch.Tensor, path: Path) -> None:
    """As BackdoorBench saves: a PIL image (mode L or RGB) written as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = image.permute(1, 2, 0).numpy()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path)


def _bb_state(folder: Path, name: str, sub: str, images, labels, original, indices, size: int, subset: bool):
    """prepro_cls_DatasetBD_v2.retrieve_state(): NumPy arrays, NumPy integer keys, PNG files."""
    save = f"./record/{name}/{sub}"
    indicator = np.zeros(size)  # BackdoorBench's default: a float array
    data_dict = {}
    for img, y, y0, i in zip(images, labels.tolist(), original.tolist(), indices.tolist()):
        _png(img, folder / sub / str(y0) / f"{i}.png")
        indicator[i] = 1
        data_dict[np.int64(i)] = {"path": f"{save}/{y0}/{i}.png", "other_info": [y, y0]}
    shown = np.where(indicator == 1)[0] if subset else np.arange(size)
    return {
        "bd_data_container": {"save_folder_path": save, "data_dict": data_dict, "save_file_format": ".png"},
        "getitem_all": True,
        "getitem_all_switch": False,
        "original_index_array": shown,
        "poison_indicator": indicator,
        "save_folder_path": save,
    }


def write_bb_record(source, folder: Path, name: str) -> dict:
    """The attack record ``source`` (ours) rewritten as BackdoorBench writes one, in
    ``folder``; returns the dict saved."""
    folder.mkdir(parents=True)
    tr, te = source.bd_train, source.bd_test
    data = {
        "model_name": source.model_name,
        "num_classes": source.num_classes,
        "model": {f"module.{k[len('net.') :]}": v for k, v in source.model.items()},
        "data_path": "./data/digits",
        "img_size": (8, 8, 1),
        "clean_data": "digits",
        "bd_train": _bb_state(
            folder, name, "bd_train_dataset", tr.images, tr.labels, tr.original_labels, tr.indices, 1437, subset=False
        ),
        "bd_test": _bb_state(
            folder, name, "bd_test_dataset", te.images, te.labels, te.original_labels, te.indices, 360, subset=True
        ),
    }
    for i in (0, 5):  # WaNet's cross test images: only PNG files, true labels
        _png(te.images[i], folder / "cross_test_dataset" / str(int(te.original_labels[i])) / f"{i}.png")
    torch.save(data, folder / RECORD_FILE)
    return data


@pytest.fixture(scope="module")
def bb_root(digits_record_root, tmp_path_factory) -> Path:
    """A record root holding ``bb``: the session's BadNets digits record in BackdoorBench's layout."""
    root = tmp_path_factory.mktemp("bb_records")
    write_bb_record(load_record(digits_record_root / "badnet_digits"), root / "bb", "bb")
    return root


@pytest.fixture
def bb_copy(bb_root, tmp_path) -> Path:
    return private_copy(bb_root, tmp_path)


def same_record(ours, theirs) -> None:
    for part in ("bd_test", "bd_train"):
        a, b = getattr(ours, part), getattr(theirs, part)
        for field in ("images", "labels", "original_labels", "indices"):
            assert torch.equal(getattr(a, field), getattr(b, field)), f"{part}.{field}"
    assert torch.equal(ours.poison_indices, theirs.poison_indices)
    x = torch.rand(6, *ours.bd_test.images.shape[1:])
    with torch.no_grad():
        assert torch.allclose(ours.build_model().eval()(x), theirs.build_model().eval()(x), atol=1e-6)


def test_a_backdoorbench_record_reads_as_ours_without_trust(bb_root, digits_record_root, caplog):
    with caplog.at_level(logging.INFO, logger="saubench"):
        record = load_record(bb_root / "bb")
    same_record(load_record(digits_record_root / "badnet_digits"), record)
    assert record.mean == (0.5,) and record.std == (0.5,) and record.img_size == (8, 8, 1)
    assert record.cross_test is not None and record.cross_test.indices.tolist() == [0, 5]
    lines = [r.getMessage() for r in caplog.records if "BackdoorBench record" in r.getMessage()]
    assert len(lines) == 1 and "cnn on digits (8x8x1, 10 classes)" in lines[0]
    assert "324 backdoor test images" in lines[0] and "'module.' prefixes removed" in lines[0]


def test_a_record_written_under_numpy_1_loads_too(bb_copy):
    """NumPy 1.x pickles its arrays as numpy.core.multiarray._reconstruct."""
    path = bb_copy / "bb" / RECORD_FILE
    data = torch.load(path, weights_only=False)
    buf = io.BytesIO()
    torch.save(data, buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in raw
    path.write_bytes(raw)
    assert len(load_record(bb_copy / "bb").bd_test) == 324


def test_other_python_objects_need_trust_record(bb_copy):
    path = bb_copy / "bb" / RECORD_FILE
    data = torch.load(path, weights_only=False)
    data["args"] = argparse.Namespace(lr=0.01)  # an object the numpy allowance does not cover
    torch.save(data, path)
    with pytest.raises(UserError, match=r"argparse.Namespace.*pass --trust_record"):
        load_record(bb_copy / "bb")
    assert load_record(bb_copy / "bb", trust=True).num_classes == 10


def test_missing_images_and_unknown_architectures_are_one_line(bb_copy):
    png = next((bb_copy / "bb" / "bd_test_dataset").rglob("*.png"))
    png.unlink()
    with pytest.raises(UserError, match=rf"{png.name}: missing \(bd_test sample"):
        load_record(bb_copy / "bb")
    path = bb_copy / "bb" / RECORD_FILE
    data = torch.load(path, weights_only=False)
    data["model_name"] = "densenet161"
    torch.save(data, path)
    with pytest.raises(UserError, match="malformed BackdoorBench record.*unknown model 'densenet161'"):
        load_record(bb_copy / "bb")


# -- our results beside BackdoorBench's ----------------------------------------------------------------------


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SAUBENCH_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_every_defense_runs_on_it_from_the_command_line_and_writes_backdoorbench_files(bb_copy):
    root, record = bb_copy, bb_copy / "bb"
    theirs = record / "defense" / "ft_bb"  # what BackdoorBench's own fine-tuning left there
    theirs.mkdir(parents=True)
    (theirs / "ft_df.csv").write_text(",".join(BB_COLUMNS) + "\n0,0,0.3,0.2,2.0,0.91,0.25,0.70\n")
    (theirs / "ft_df_summary.csv").write_text(
        ",".join(BB_COLUMNS[1:]).join([",", "\n"]) + "last,0,0.3,0.2,2.0,0.91,0.25,0.70\nvalid_max,0,0.3,0.2,2.0,0.91,"
        "0.25,0.70\nexist_nan_value,False,False,False,False,False,False,False\n"
    )
    proc = cli("defense/sau.py", "--result_file", "bb", "--record_root", str(root), "--device", "cpu", "--epochs", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "BackdoorBench record" in (record / "defense" / "sau" / "sau.log").read_text()
    proc = cli(
        "defense/compare.py",
        "--result_file",
        "bb",
        "--record_root",
        str(root),
        "--device",
        "cpu",
        "--smoke",
        "--name",
        "bb",
        "--no-plots",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = [n for n in defense.list_defenses() if defense.DEFENSES.get(n).kind == "mitigation"]  # compare's default
    reference = load_record(record)
    for name in names:
        out = record / "defense" / name
        rows = read_rows(out / f"{name}_df.csv")
        assert rows[0][: len(BB_COLUMNS)] == BB_COLUMNS and rows[-1][5], f"{name}: columns or last row"
        summary = read_rows(out / f"{name}_df_summary.csv")
        assert summary[0] == rows[0] and [r[0] for r in summary[1:]] == ["last", "valid_max", "exist_nan_value"]
        after = json.loads((out / "summary.json").read_text())["after"]
        assert float(summary[1][5]) == pytest.approx(after["clean_acc"])
        raw = torch.load(out / "defense_result.pt", weights_only=True)
        # besides pruning masks and NPD's polarizer (both rebuilt by load_weights): the record's architecture
        assert {k for k in raw["model"] if not k.startswith(("masks.", "polarizers."))} == {
            k[4:] for k in reference.model
        }
        reference.build_model(load_defense_result(out / "defense_result.pt")["model"])
    table = json.loads((root / "compare" / "bb" / "table.json").read_text())
    assert table["defenses"] == [*names, "ft_bb (BackdoorBench)"]
    row = next(r for r in table["rows"] if r["defense"] == "ft_bb (BackdoorBench)")
    assert row["c_acc"] == pytest.approx(91.0) and row["asr"] == pytest.approx(25.0) and row["der"] is not None
    assert "ft_bb (BackdoorBench)" in proc.stdout


def test_our_run_does_not_replace_backdoorbench_results_of_the_same_name(bb_copy):
    theirs = bb_copy / "bb" / "defense" / "sau"
    theirs.mkdir(parents=True)
    (theirs / "sau_df_summary.csv").write_text(",test_acc\nlast,0.9\n")
    with pytest.raises(UserError, match="holds BackdoorBench's own sau result: pass --result_name"):
        defense.run("sau", result_file="bb", record_root=str(bb_copy), device="cpu", epochs=0)
    summary = defense.run(
        "sau", result_file="bb", record_root=str(bb_copy), device="cpu", epochs=0, result_name="sau_saubench"
    )
    assert summary["after"] == summary["before"]
    assert [name for name, _ in defense_results(bb_copy / "bb")] == ["sau"]
    rows = read_rows(bb_copy / "bb" / "defense" / "sau_saubench" / "sau_df.csv")
    assert len(rows) == 2 and rows[1][1] == "" and float(rows[1][5]) == pytest.approx(summary["after"]["clean_acc"])


def test_summary_csv_is_backdoorbench_s_last_valid_max_and_nan_flag():
    history = History()
    history.add(epoch=0, loss=2.0, test_acc=0.5)
    history.add(epoch=1, loss=1.0)
    history.add(epoch=2, loss=3.0, test_acc=float("nan"))
    text = history.summary_csv(("epoch", "test_acc"))
    assert text.splitlines() == [
        ",epoch,test_acc,loss",
        "last,2,nan_value,3.0",
        "valid_max,2,0.5,3.0",
        "exist_nan_value,False,True,False",
    ]


# -- --export_backdoorbench --------------------------------------------------------------------------------


def test_export_reads_back_into_the_same_tensors_and_outputs(tmp_path):
    attack.run(
        "badnet",
        dataset="digits",
        epochs=1,
        save_folder_name="exp",
        record_root=str(tmp_path),
        device="cpu",
        export_backdoorbench=True,
    )
    ours, folder = load_record(tmp_path / "exp"), tmp_path / "exp" / "backdoorbench"
    same_record(ours, load_record(folder))
    data = torch.load(folder / RECORD_FILE, weights_only=False)
    assert isinstance(data["bd_test"]["poison_indicator"], np.ndarray) and data["img_size"] == (8, 8, 1)
    assert set(data["model"]) == {k[len("net.") :] for k in ours.model}
    entry = next(iter(data["bd_test"]["bd_data_container"]["data_dict"].values()))
    assert entry["path"].startswith("./record/exp/backdoorbench/bd_test_dataset/")
    assert (tmp_path / entry["path"][len("./record/") :]).is_file()
    assert "export_backdoorbench" not in ours.config  # how the run was written, not what it computed
