"""Dataset loaders on small files written here in the real on-disk formats (no network),
the messages for missing or broken files, every registered dataset's declaration, and
the train transform."""

from __future__ import annotations

import dataclasses
import gzip
import pickle
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from utils import datasets
from utils.datasets import dataset_info, list_datasets, load_dataset, train_transform
from utils.errors import UserError


def _patch_entry(monkeypatch, name: str, **changes) -> None:
    """Replace fields of a registry entry (download, fallbacks) for one test."""
    monkeypatch.setitem(datasets._DATASETS, name, dataclasses.replace(datasets._DATASETS[name], **changes))


@pytest.fixture
def no_debian_fashion(monkeypatch):
    """Fashion-MNIST without the Debian package's folder, present on some machines only."""
    _patch_entry(monkeypatch, "fashion_mnist", fallbacks=())


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# -- CIFAR: pickled batches ----------------------------------------------------------------------


def _write_batch(path: Path, images: np.ndarray, labels: np.ndarray, label_key: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = {b"batch_label": b"test", b"data": images.reshape(len(images), 3072), label_key: labels.tolist()}
    with open(path, "wb") as fh:
        pickle.dump(batch, fh, protocol=2)


def _cifar_images(n: int, seed: int) -> np.ndarray:
    images = _rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    images[0] = 0
    images[0, 1, 2, 5] = 200  # green, row 2, column 5
    return images


@pytest.mark.parametrize("place", ["cifar-10-batches-py", "cifar10", "cifar10/cifar-10-batches-py", "."])
def test_cifar10(tmp_path, place):
    folder = tmp_path / place
    train_images, train_labels = [], []
    for i in range(1, 6):
        images, labels = _cifar_images(3, seed=i), _rng(10 + i).integers(0, 10, 3)
        _write_batch(folder / f"data_batch_{i}", images, labels, b"labels")
        train_images.append(images)
        train_labels.append(labels)
    test_images, test_labels = _cifar_images(4, seed=0), np.array([9, 0, 1, 2])
    _write_batch(folder / "test_batch", test_images, test_labels, b"labels")

    data = load_dataset("cifar10", tmp_path, download=False)
    assert data.root == folder and data.info.num_classes == 10
    assert data.train.images.shape == (15, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert torch.equal(data.train.images, torch.from_numpy(np.concatenate(train_images)))
    assert data.train.labels.tolist() == np.concatenate(train_labels).tolist()
    assert torch.equal(data.test.images, torch.from_numpy(test_images)) and data.test.labels.tolist() == [9, 0, 1, 2]
    first = data.test.images[0]
    assert first[1, 2, 5] == 200 and int(first.sum()) == 200  # channel-major, then rows, then columns
    assert data.train.images[3, 1, 2, 5] == 200 and int(data.train.images[3].sum()) == 200  # data_batch_2's first


def test_cifar100_reads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    images = _cifar_images(5, seed=1)
    _write_batch(folder / "train", images, np.array([0, 99, 50, 3, 7]), b"fine_labels")
    _write_batch(folder / "test", images[:2], np.array([99, 1]), b"fine_labels")
    data = load_dataset("cifar100", tmp_path, download=False)
    assert data.info.num_classes == 100 and data.train.labels.tolist() == [0, 99, 50, 3, 7]
    assert torch.equal(data.train.images, torch.from_numpy(images)) and data.test.labels.tolist() == [99, 1]


def test_cifar_batch_without_labels_is_user_error(tmp_path):
    folder = tmp_path / "cifar-100-python"
    _write_batch(folder / "train", _cifar_images(2, 0), np.array([0, 1]), b"coarse_labels")
    _write_batch(folder / "test", _cifar_images(2, 0), np.array([0, 1]), b"fine_labels")
    with pytest.raises(UserError, match=r"train: not a CIFAR batch file .*fine_labels"):
        load_dataset("cifar100", tmp_path, download=False)
    (folder / "train").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="train: not a CIFAR batch file"):
        load_dataset("cifar100", tmp_path, download=False)


# -- MNIST and Fashion-MNIST: IDX files ----------------------------------------------------------


def _idx(array: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_idx_set(folder: Path, gz: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = _rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 6).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([7, 0, 9], dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(_idx(array)))
        else:
            (folder / stem).write_bytes(_idx(array))
    return arrays


def _assert_idx_loaded(data, arrays: dict[str, np.ndarray]) -> None:
    assert data.train.images.shape == (6, 1, 28, 28) and data.test.images.shape == (3, 1, 28, 28)
    assert torch.equal(data.train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert torch.equal(data.test.images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert data.train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert data.test.labels.tolist() == [7, 0, 9] and data.test.labels.dtype == torch.long


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize(
    "name,place",
    [
        ("mnist", "mnist"),
        ("mnist", "MNIST/raw"),
        ("mnist", "."),
        ("fashion_mnist", "fashion_mnist"),
        ("fashion_mnist", "FashionMNIST/raw"),
        ("fashion_mnist", "."),
    ],
)
def test_idx_datasets(tmp_path, name, place, gz, no_debian_fashion):
    arrays = _write_idx_set(tmp_path / place, gz)
    data = load_dataset(name, tmp_path, download=False)
    assert data.root == tmp_path / place and data.info.size == (28, 28) and data.info.channels == 1
    _assert_idx_loaded(data, arrays)


def test_fashion_mnist_falls_back_to_a_system_folder(tmp_path, monkeypatch):
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    arrays = _write_idx_set(system, gz=True)
    _patch_entry(monkeypatch, "fashion_mnist", fallbacks=(system,))
    data = load_dataset("fashion_mnist", tmp_path / "missing", download=False)
    assert data.root == system
    _assert_idx_loaded(data, arrays)
    mine = _write_idx_set(tmp_path / "data" / "fashion_mnist", gz=False, seed=1)
    _assert_idx_loaded(load_dataset("fashion_mnist", tmp_path / "data", download=False), mine)  # data_root first


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("gz,keep", [(False, 500), (False, 6), (True, 300)], ids=["body", "header", "gz"])
def test_truncated_idx_is_one_line_user_error(tmp_path, gz, keep):
    _write_idx_set(tmp_path, gz)
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    _truncate(path, keep)
    with pytest.raises(UserError, match="truncated") as err:
        load_dataset("mnist", tmp_path, download=False)
    message = str(err.value)
    assert str(path) in message and "\n" not in message


# -- GTSRB: torchvision's layout -----------------------------------------------------------------


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]))  # cv2 writes BGR


def _solid(h: int, w: int, rgb) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (h, w, 3)).copy()


RED, GREEN, BLUE = (250, 10, 20), (10, 240, 30), (20, 30, 230)


def test_gtsrb_resizes_every_image_to_32(tmp_path):
    base = tmp_path / "gtsrb"
    training = base / "GTSRB" / "Training"
    _write_rgb(training / "00000" / "00000_00000.ppm", _solid(40, 36, RED))
    _write_rgb(training / "00000" / "00000_00001.ppm", _solid(29, 31, RED))
    halves = np.concatenate([_solid(64, 32, GREEN), _solid(64, 32, BLUE)], axis=1)  # left green, right blue
    _write_rgb(training / "00042" / "00000_00000.ppm", halves)
    (training / "00042" / "GT-00042.csv").write_text("Filename;ClassId\n00000_00000.ppm;42\n")  # not an image
    images = base / "GTSRB" / "Final_Test" / "Images"
    _write_rgb(images / "00000.ppm", _solid(50, 45, BLUE))
    _write_rgb(images / "00001.ppm", _solid(32, 32, GREEN))
    (base / "GT-final_test.csv").write_text(
        "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\r\n"
        "00000.ppm;45;50;5;5;40;45;17\r\n00001.ppm;32;32;5;5;27;27;42\r\n"
    )

    data = load_dataset("gtsrb", tmp_path, download=False)
    assert data.root == base and data.info.num_classes == 43
    assert data.train.images.shape == (3, 3, 32, 32) and data.test.images.shape == (2, 3, 32, 32)
    assert data.train.labels.tolist() == [0, 0, 42] and data.test.labels.tolist() == [17, 42]
    for image, rgb in zip([*data.train.images[:2], *data.test.images], [RED, RED, BLUE, GREEN]):
        assert torch.equal(image, torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 32))
    resized = data.train.images[2]
    assert (resized[:, :, :15] == torch.tensor(GREEN).view(3, 1, 1)).all()
    assert (resized[:, :, 17:] == torch.tensor(BLUE).view(3, 1, 1)).all()


# -- Tiny-ImageNet -------------------------------------------------------------------------------


def test_tiny_imagenet(tmp_path):
    folder = tmp_path / "tiny-imagenet-200"
    wnids = {"n02": GREEN, "n01": RED, "n03": BLUE}  # labels follow the sorted wnids
    folder.mkdir()
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid, rgb in wnids.items():
        for i in range(2):
            _write_rgb(folder / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", _solid(64, 64, rgb))
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
    annotations = []
    for i, wnid in enumerate(["n03", "n01"]):
        _write_rgb(folder / "val" / "images" / f"val_{i}.JPEG", _solid(64, 64, wnids[wnid]))
        annotations.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")

    data = load_dataset("tiny", tmp_path, download=False)
    assert data.root == folder and data.info.size == (64, 64) and data.info.num_classes == 200
    assert data.train.images.shape == (6, 3, 64, 64) and data.test.images.shape == (2, 3, 64, 64)
    assert data.train.labels.tolist() == [0, 0, 1, 1, 2, 2] and data.test.labels.tolist() == [2, 0]
    expected = {0: RED, 1: GREEN, 2: BLUE}
    for split in (data.train, data.test):
        for image, label in zip(split.images, split.labels.tolist()):  # JPEG: close, not equal
            mean = image.float().mean(dim=(1, 2))
            assert torch.allclose(mean, torch.tensor(expected[label], dtype=torch.float), atol=8), (label, mean)


# -- imagefolder -------------------------------------------------------------------------------


def _write_imagefolder(root: Path, sizes=((10, 12), (10, 12))) -> np.ndarray:
    rng = _rng(3)
    pattern = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    for split, counts in (("train", {"cat": 2, "dog": 1, "eel": 1}), ("test", {"dog": 1, "cat": 1})):
        for cls, n in counts.items():
            for i in range(n):
                h, w = sizes[0] if split == "train" else sizes[1]
                image = pattern if (cls, i) == ("cat", 0) else rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                _write_rgb(root / split / cls / f"{i}.png", image[:h, :w])
    return pattern


def test_imagefolder_discovers_classes_and_size(tmp_path):
    pattern = _write_imagefolder(tmp_path / "imagefolder")
    data = load_dataset("imagefolder", tmp_path, download=False)
    assert data.info.num_classes == 3 and data.info.size == (10, 12) and data.info.channels == 3
    assert data.info.img_size == (10, 12, 3) and len(data.info.mean) == 3
    assert data.train.labels.tolist() == [0, 0, 1, 2] and data.test.labels.tolist() == [0, 1]  # sorted classes
    assert torch.equal(data.train.images[0], torch.from_numpy(pattern).permute(2, 0, 1))  # PNG: exact, RGB
    assert torch.equal(data.test.images[0], data.train.images[0])


def test_imagefolder_resizes_with_img_size(tmp_path):
    _write_imagefolder(tmp_path, sizes=((10, 12), (20, 9)))
    data = load_dataset("imagefolder", tmp_path, download=False, img_size=8)
    assert data.info.size == (8, 8) and data.train.images.shape == (4, 3, 8, 8)
    assert data.test.images.shape == (2, 3, 8, 8)
    assert load_dataset("imagefolder", tmp_path, img_size=(6, 7)).train.images.shape == (4, 3, 6, 7)


def test_imagefolder_of_mixed_sizes_needs_img_size(tmp_path):
    _write_imagefolder(tmp_path)
    _write_rgb(tmp_path / "train" / "dog" / "big.png", _solid(20, 20, RED))
    with pytest.raises(UserError, match="different sizes.*--img_size"):
        load_dataset("imagefolder", tmp_path)
    (tmp_path / "train" / "dog" / "big.png").unlink()
    for png in (tmp_path / "test").rglob("*.png"):  # the test split all of another size
        _write_rgb(png, _solid(20, 20, RED))
    with pytest.raises(UserError, match="train images are 10x12 but test images are 20x20; pass --img_size"):
        load_dataset("imagefolder", tmp_path)


def test_imagefolder_empty_class_or_split_is_user_error(tmp_path):
    _write_imagefolder(tmp_path)
    (tmp_path / "train" / "fox").mkdir()
    with pytest.raises(UserError, match="train/fox/ holds no images"):
        load_dataset("imagefolder", tmp_path)
    (tmp_path / "train" / "fox").rmdir()
    for png in (tmp_path / "test").rglob("*.png"):
        png.unlink()
    with pytest.raises(UserError, match="the test split is empty"):
        load_dataset("imagefolder", tmp_path)


# -- digits ------------------------------------------------------------------------------------


def test_digits_split():
    data = load_dataset("digits", "/nonexistent", download=False)  # bundled: no files, no folder
    assert data.root is None
    assert data.train.images.shape == (1437, 1, 8, 8) and data.test.images.shape == (360, 1, 8, 8)
    assert int(data.train.images.max()) == 255 and int(data.train.images.min()) == 0
    for split in (data.train, data.test):
        assert set(split.labels.tolist()) == set(range(10))
    again = load_dataset("digits")
    assert torch.equal(again.train.images, data.train.images) and torch.equal(again.test.labels, data.test.labels)


# -- missing files, failed downloads, unknown names ---------------------------------------------


def test_missing_files_without_download_say_what_to_put_where(tmp_path):
    with pytest.raises(UserError) as err:
        load_dataset("cifar10", tmp_path, download=False)
    message = str(err.value)
    assert "cifar-10-batches-py/" in message and str(tmp_path / "cifar10") in message and "\n" not in message


def test_missing_data_root_is_named(tmp_path, no_debian_fashion):
    root = tmp_path / "no-such-folder"
    for name in ("mnist", "fashion_mnist", "gtsrb"):
        with pytest.raises(UserError, match=f"--data_root {root} does not exist; {name} needs .* in {root / name}/"):
            load_dataset(name, root, download=False)


def test_failed_download_is_one_line_user_error(tmp_path, monkeypatch, no_debian_fashion):
    calls = []

    def fail(root: Path) -> None:
        calls.append(root)
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>\nmore detail")

    _patch_entry(monkeypatch, "fashion_mnist", download=fail)
    root = tmp_path / "data"
    with pytest.raises(UserError) as err:
        load_dataset("fashion_mnist", root)
    message = str(err.value)
    assert calls == [root] and "\n" not in message
    assert "download failed (<urlopen error [Errno -3] Temporary failure in name resolution>)" in message
    assert "train-images-idx3-ubyte" in message and str(root / "fashion_mnist") in message


def test_download_that_brings_the_files_is_used(tmp_path, monkeypatch):
    _patch_entry(monkeypatch, "mnist", download=lambda root: _write_idx_set(root / "MNIST" / "raw", gz=True))
    data = load_dataset("mnist", tmp_path / "data")
    assert data.root == tmp_path / "data" / "MNIST" / "raw" and len(data.train) == 6


@pytest.mark.parametrize("call", [lambda: load_dataset("cifar1"), lambda: dataset_info("minst")])
def test_unknown_dataset_suggests_close_names(call):
    with pytest.raises(UserError, match=r"unknown dataset '\w+'; did you mean (cifar10|mnist)"):
        call()


# -- declarations ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_datasets())
def test_declared_info_is_sensible(name):
    info = dataset_info(name)
    assert info.name == name and info.files
    assert info.channels in (1, 3) and len(info.mean) == len(info.std) == info.channels
    assert all(0 <= m <= 1 for m in info.mean) and all(0 < s <= 1 for s in info.std)
    if name == "imagefolder":  # discovered when loaded
        assert info.num_classes == 0 and info.size == (0, 0)
    else:
        assert info.num_classes >= 10 and min(info.size) >= 8 and 0 <= info.crop_padding < min(info.size)
        assert info.img_size == (*info.size, info.channels)


def test_known_declarations():
    assert {n: (dataset_info(n).num_classes, dataset_info(n).img_size) for n in list_datasets()} == {
        "cifar10": (10, (32, 32, 3)),
        "cifar100": (100, (32, 32, 3)),
        "digits": (10, (8, 8, 1)),
        "fashion_mnist": (10, (28, 28, 1)),
        "gtsrb": (43, (32, 32, 3)),
        "imagefolder": (0, (0, 0, 3)),
        "mnist": (10, (28, 28, 1)),
        "tiny": (200, (64, 64, 3)),
    }
    assert [n for n in list_datasets() if dataset_info(n).hflip] == ["cifar10"]  # as BackdoorBench


# -- train transform ---------------------------------------------------------------------------


def _shifts(image: torch.Tensor, p: int) -> torch.Tensor:
    """Every crop of the zero-padded image, then their mirror images: (2 (2p+1)^2, C, H, W)."""
    padded = torch.nn.functional.pad(image, (p, p, p, p))
    h, w = image.shape[-2:]
    crops = torch.stack([padded[:, dy : dy + h, dx : dx + w] for dy in range(2 * p + 1) for dx in range(2 * p + 1)])
    return torch.cat([crops, crops.flip(-1)])


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist", "digits"])
def test_train_transform_crops_and_flips(name):
    info = dataclasses.replace(dataset_info(name), size=(6, 7))
    p, c = info.crop_padding, info.channels
    image = torch.arange(1, c * 6 * 7 + 1, dtype=torch.float).view(c, 6, 7) / (c * 6 * 7)  # all distinct, > 0
    x = image.expand(1000, c, 6, 7)
    out = train_transform(info, x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    matches = (out[:, None] == _shifts(image, p)[None]).flatten(2).all(-1)  # (samples, crops)
    assert (matches.sum(1) == 1).all()  # each output is one shift of the padded image, or its mirror
    found, n = matches.float().argmax(1), (2 * p + 1) ** 2
    assert len(set((found % n).tolist())) == n  # every offset occurs
    flipped = int((found >= n).sum())
    assert (400 < flipped < 600) if info.hflip else flipped == 0


def test_train_transform_is_deterministic_given_a_generator():
    info = dataset_info("cifar10")
    x = torch.rand(16, 3, 32, 32)
    first = train_transform(info, x, torch.Generator().manual_seed(7))
    assert torch.equal(first, train_transform(info, x, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, train_transform(info, x, torch.Generator().manual_seed(8)))
    assert torch.equal(train_transform(dataclasses.replace(info, crop_padding=0, hflip=False), x), x)
