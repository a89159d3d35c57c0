"""Datasets: a registry of loaders that return whole splits as uint8 NCHW tensors.

Every image between components is a float tensor in [0, 1]; at rest it is uint8. The
benchmark's datasets fit in memory (CIFAR-10: 180 MB), so each split is one tensor and
batches are sliced from it, with the train transform applied on the device.

``--data_root DIR`` (default ./data): dataset X is read from DIR/X/, from the folder
torchvision downloads it to, or from DIR itself when DIR holds X's files. When the files
are missing, torchvision downloads them where it can; otherwise one line says which files
to put where.
"""

from __future__ import annotations

import gzip
import logging
import pickle
import struct
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from utils.errors import UserError, unknown_name

log = logging.getLogger("saubench")

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class ImageData:
    """One split: ``images`` uint8 (N, C, H, W) and ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 NCHW, got {self.images.dtype} {tuple(self.images.shape)}")
        self.labels = torch.as_tensor(self.labels, dtype=torch.long)
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must be one per image")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: torch.Tensor | Sequence[int]) -> "ImageData":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageData(self.images[idx], self.labels[idx])


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset declares: its shape, classes, normalisation constants (the models'
    first layer) and its train transform (random crop with ``crop_padding``, horizontal
    flip when ``hflip``; the test transform is the identity)."""

    name: str
    num_classes: int
    channels: int
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 4
    hflip: bool = False
    files: str = ""  # what to put where, for the "missing files" message

    @property
    def img_size(self) -> tuple[int, int, int]:
        """(H, W, C), BackdoorBench's convention."""
        return (self.size[0], self.size[1], self.channels)


@dataclass
class Dataset:
    info: DatasetInfo
    train: ImageData
    test: ImageData
    root: Path | None = None


def train_transform(info: DatasetInfo, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding and (where declared) horizontal flip, per sample, on
    a float batch on any device."""
    n, _, h, w = x.shape
    p = info.crop_padding
    if p > 0:
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (n,), device=x.device, generator=generator)
        ox = torch.randint(0, 2 * p + 1, (n,), device=x.device, generator=generator)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # n, h, 1
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]  # n, 1, w
        batch = torch.arange(n, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if info.hflip:
        flip = torch.rand(n, device=x.device, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x.contiguous()


# -- registry ----------------------------------------------------------------------------------------

Loader = Callable[[Path, DatasetInfo, dict], tuple[ImageData, ImageData]]


@dataclass(frozen=True)
class DatasetEntry:
    info: DatasetInfo
    load: Loader  # (folder holding the files, info, options) -> (train, test)
    present: Callable[[Path], bool]  # does this folder hold the files?
    subfolders: tuple[str, ...] = ()  # where, below data_root, the files may sit
    download: Callable[[Path], None] | None = None
    fallbacks: tuple[Path, ...] = field(default_factory=tuple)
    bundled: bool = False  # ships with an installed package; no files to find


_DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(
    info: DatasetInfo,
    *,
    present: Callable[[Path], bool] = lambda folder: True,
    subfolders: Iterable[str] = (),
    download: Callable[[Path], None] | None = None,
    fallbacks: Iterable[Path] = (),
    bundled: bool = False,
):
    """Register a loader ``load(folder, info, options) -> (train, test)`` under ``info.name``."""

    def wrap(load: Loader) -> Loader:
        _DATASETS[info.name] = DatasetEntry(info, load, present, tuple(subfolders), download, tuple(fallbacks), bundled)
        return load

    return wrap


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def dataset_entry(name: str) -> DatasetEntry:
    """The registration of dataset ``name``: its info, where its files may be, how they are fetched."""
    if name not in _DATASETS:
        raise unknown_name("dataset", name, _DATASETS)
    return _DATASETS[name]


def dataset_info(name: str) -> DatasetInfo:
    """The declared info of a registered dataset (no files are read)."""
    return dataset_entry(name).info


def find_files(name: str, data_root: Path) -> Path | None:
    """The folder that holds ``name``'s files under ``data_root``, or None."""
    entry = _DATASETS[name]
    root = Path(data_root)
    for folder in [root / name, *(root / s for s in entry.subfolders), root, *entry.fallbacks]:
        if folder.is_dir() and entry.present(folder):
            return folder
    return None


def load_dataset(name: str, data_root: str | Path = "data", download: bool = True, **options) -> Dataset:
    """Load both splits of dataset ``name``; ``options`` go to the loader (``img_size``
    for imagefolder)."""
    if name not in _DATASETS:
        raise unknown_name("dataset", name, _DATASETS)
    entry = _DATASETS[name]
    folder = None if entry.bundled else _locate(name, entry, Path(data_root), download)
    train, test = entry.load(folder, entry.info, options)
    where = folder if folder is not None else "the installed packages"
    info = _check(entry.info, train, test, where)
    log.info(
        "%s: %d train / %d test images of %s from %s",
        name,
        len(train),
        len(test),
        "x".join(map(str, train.images.shape[1:])),
        where,
    )
    return Dataset(info, train, test, folder)


def _locate(name: str, entry: DatasetEntry, root: Path, download: bool) -> Path:
    folder = find_files(name, root)
    if folder is None and entry.download is not None and download:
        log.info("%s: files not found under %s; downloading", name, root)
        try:
            root.mkdir(parents=True, exist_ok=True)
            entry.download(root)
        except Exception as exc:  # any network or archive failure
            raise UserError(
                f"{name}: files not found and the download failed ({_reason(exc)}); "
                f"put {entry.info.files} in {root / name}/"
            ) from None
        folder = find_files(name, root)
    if folder is None:
        if not root.exists():
            raise UserError(f"--data_root {root} does not exist; {name} needs {entry.info.files} in {root / name}/")
        raise UserError(f"{name}: files not found; put {entry.info.files} in {root / name}/")
    return folder


def _reason(exc: BaseException) -> str:
    """An exception as a short phrase: the first line of its message, or its type."""
    lines = str(exc).strip().splitlines()
    return lines[0][:160] if lines else type(exc).__name__


def _check(info: DatasetInfo, train: ImageData, test: ImageData, folder: Path | str) -> DatasetInfo:
    """Fill in what a loader discovered (imagefolder) and check the files against the
    declaration."""
    for split, data in (("train", train), ("test", test)):
        if len(data) == 0:
            raise UserError(f"{info.name} in {folder}: the {split} split is empty")
    c, h, w = train.images.shape[1:]
    if info.num_classes <= 0:  # discovered at load time
        info = replace(info, num_classes=int(max(train.labels.max(), test.labels.max())) + 1, channels=c, size=(h, w))
    if (c, h, w) != (info.channels, *info.size) or tuple(test.images.shape[1:]) != (c, h, w):
        raise UserError(
            f"{info.name} in {folder}: images are {tuple(train.images.shape[1:])} (train) and "
            f"{tuple(test.images.shape[1:])} (test), expected {(info.channels, *info.size)}"
        )
    for split, data in (("train", train), ("test", test)):
        if int(data.labels.min()) < 0 or int(data.labels.max()) >= info.num_classes:
            raise UserError(f"{info.name} in {folder}: {split} labels outside 0..{info.num_classes - 1}")
    return info


# -- file formats -------------------------------------------------------------------------------------


def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _first_existing(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not, as a uint8 array."""
    try:
        with _open_maybe_gz(path) as fh:
            data = fh.read()
    except (OSError, EOFError, zlib.error) as exc:  # a truncated or corrupt .gz
        raise UserError(f"{path}: cannot read this file ({_reason(exc)}; truncated?)") from None
    if len(data) < 4:
        raise UserError(f"{path}: not an IDX file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise UserError(f"{path}: not an unsigned-byte IDX file")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path}: the IDX header is cut short (truncated?)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    body = np.frombuffer(data, dtype=np.uint8, offset=header)
    if body.size != int(np.prod(dims)):
        raise UserError(f"{path}: IDX header says {dims} but the file holds {body.size} bytes (truncated?)")
    return body.reshape(dims)


_IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_present(folder: Path) -> bool:
    return all(_first_existing(folder, stem) for pair in _IDX_STEMS.values() for stem in pair)


def _load_idx(folder: Path, info: DatasetInfo, options: dict) -> tuple[ImageData, ImageData]:
    splits = []
    for images_stem, labels_stem in _IDX_STEMS.values():
        images = read_idx(_first_existing(folder, images_stem))
        labels = read_idx(_first_existing(folder, labels_stem))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(f"{folder}: IDX images {images.shape} and labels {labels.shape} do not match")
        splits.append(
            ImageData(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
        )
    return splits[0], splits[1]


def _torchvision_download(cls_name: str) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        import torchvision.datasets as tvd

        getattr(tvd, cls_name)(root=str(root), train=True, download=True)
        getattr(tvd, cls_name)(root=str(root), train=False, download=True)

    return download


IDX_FILES = (
    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (.gz or not)"
)

register_dataset(
    DatasetInfo("mnist", 10, 1, (28, 28), (0.5,), (0.5,), crop_padding=4, files=IDX_FILES),
    present=_idx_present,
    subfolders=("MNIST/raw",),
    download=_torchvision_download("MNIST"),
)(_load_idx)
register_dataset(
    DatasetInfo("fashion_mnist", 10, 1, (28, 28), (0.5,), (0.5,), crop_padding=4, files=IDX_FILES),
    present=_idx_present,
    subfolders=("FashionMNIST/raw", "fashion-mnist"),
    download=_torchvision_download("FashionMNIST"),
    fallbacks=(DEBIAN_FASHION_MNIST,),
)(_load_idx)


# CIFAR: the "python version" pickled batches -------------------------------------------------------
#
# Dataset files are never unpickled as such: a dataset folder may come from anyone, and
# pickle.load runs whatever a file asks it to. A CIFAR batch is a dict of bytes keys to
# bytes, lists of ints or bytes, and one uint8 NumPy array; :class:`CifarUnpickler`
# rebuilds exactly that: the only callables it lets a file name are NumPy's array
# reconstruction (``numpy.core.multiarray._reconstruct`` in files written by NumPy 1.x
# such as the real ones, ``numpy._core`` in 2.x; ``numpy.ndarray``, ``numpy.dtype``)
# and, for files that Python 3 wrote with protocol 2, ``_codecs.encode`` limited to
# latin-1 (how that protocol spells bytes). Anything else is refused before it is called.


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a callable that a CIFAR batch never holds (message: which)."""


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it (bytes spelled as latin-1 text), and only so."""
    if (
        not isinstance(text, str)
        or not isinstance(encoding, str)
        or encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591")
    ):
        raise RefusedGlobal(f"it calls _codecs.encode with {encoding!r}"[:120])
    return text.encode("latin-1")


def _cifar_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }


class CifarUnpickler(pickle.Unpickler):
    """An unpickler of CIFAR batch files that can build nothing but their contents
    (dicts, lists, bytes, numbers and NumPy arrays): any other global a file names is
    refused with :class:`RefusedGlobal` before it is looked up, let alone called."""

    ALLOWED = _cifar_globals()

    def find_class(self, module: str, name: str) -> object:
        found = self.ALLOWED.get((module, name))
        if found is None:
            raise RefusedGlobal(f"it names {module}.{name}"[:120])
        return found

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("it holds a persistent id")


def _unpickle(path: Path) -> dict:
    """A CIFAR batch file, read with :class:`CifarUnpickler` (never plain pickle)."""
    try:
        with open(path, "rb") as fh:
            data = CifarUnpickler(fh, encoding="bytes").load()
    except RefusedGlobal as exc:
        raise UserError(
            f"{path}: not a CIFAR batch file ({_reason(exc)}; a CIFAR batch holds only arrays, lists "
            "and numbers, and dataset files are never unpickled)"
        ) from None
    except Exception as exc:  # any damage: truncated, not a pickle, wrong values
        raise UserError(f"{path}: not a CIFAR batch file ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a CIFAR batch file (it holds a {type(data).__name__}, not a dict)")
    return data


def _cifar_batches(files: Sequence[Path], label_key: bytes) -> ImageData:
    images, labels = [], []
    for path in files:
        batch = _unpickle(path)
        try:
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[label_key], dtype=np.int64).reshape(-1))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(
                f"{path}: not a CIFAR batch file (expected b'data', N x 3072 bytes, and "
                f"{label_key!r}; {type(exc).__name__}: {_reason(exc)})"
            ) from None
        if len(labels[-1]) != len(images[-1]):
            raise UserError(f"{path}: {len(images[-1])} images but {len(labels[-1])} labels")
    return ImageData(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


def _cifar_download(cls_name: str) -> Callable[[Path], None]:
    """Fetch and unpack torchvision's CIFAR archive (its URL and MD5) without building
    torchvision's dataset class, which would unpickle the files; they are then read
    with :class:`CifarUnpickler` like any others."""

    def download(root: Path) -> None:
        import torchvision.datasets as tvd
        from torchvision.datasets.utils import download_and_extract_archive

        cls = getattr(tvd, cls_name)
        download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)

    return download


_CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def _load_cifar10(folder: Path, info: DatasetInfo, options: dict) -> tuple[ImageData, ImageData]:
    return (
        _cifar_batches([folder / f for f in _CIFAR10_TRAIN], b"labels"),
        _cifar_batches([folder / "test_batch"], b"labels"),
    )


def _load_cifar100(folder: Path, info: DatasetInfo, options: dict) -> tuple[ImageData, ImageData]:
    return (_cifar_batches([folder / "train"], b"fine_labels"), _cifar_batches([folder / "test"], b"fine_labels"))


register_dataset(
    DatasetInfo(
        "cifar10",
        10,
        3,
        (32, 32),
        (0.4914, 0.4822, 0.4465),
        (0.247, 0.243, 0.261),
        crop_padding=4,
        hflip=True,
        files="cifar-10-batches-py/ (data_batch_1..5, test_batch)",
    ),
    present=lambda f: all((f / n).is_file() for n in [*_CIFAR10_TRAIN, "test_batch"]),
    subfolders=("cifar-10-batches-py", "cifar10/cifar-10-batches-py"),
    download=_cifar_download("CIFAR10"),
)(_load_cifar10)
register_dataset(
    DatasetInfo(
        "cifar100",
        100,
        3,
        (32, 32),
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        crop_padding=4,
        hflip=False,
        files="cifar-100-python/ (train, test)",
    ),
    present=lambda f: (f / "train").is_file() and (f / "test").is_file(),
    subfolders=("cifar-100-python", "cifar100/cifar-100-python"),
    download=_cifar_download("CIFAR100"),
)(_load_cifar100)


# Folders of image files (GTSRB, Tiny-ImageNet, a user's own) ---------------------------------------

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".tif", ".tiff", ".webp"}


def read_image(path: Path, size: tuple[int, int] | None, channels: int = 3) -> np.ndarray:
    """One image file as uint8 (C, H, W), RGB or grey, resized (bilinear) to ``size``."""
    import cv2

    flag = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
    img = cv2.imread(str(path), flag)
    if img is None:
        raise UserError(f"{path}: cannot read this image file")
    if channels == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if size is not None and img.shape[:2] != tuple(size):
        img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return img[None] if img.ndim == 2 else img.transpose(2, 0, 1)


def read_images(
    paths: Sequence[Path], labels: Sequence[int], size: tuple[int, int] | None, channels: int = 3
) -> ImageData:
    if not paths:
        return ImageData(torch.zeros((0, channels, *(size or (1, 1))), dtype=torch.uint8), torch.zeros(0))
    arrays = [read_image(p, size, channels) for p in paths]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise UserError(
            f"{paths[0].parent.parent}: images have different sizes {sorted(shapes)[:3]}; "
            "pass --img_size to resize them"
        )
    return ImageData(torch.from_numpy(np.stack(arrays)), torch.tensor(list(labels), dtype=torch.long))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


# GTSRB, in the layout torchvision downloads: GTSRB/Training/000NN/*.ppm, GTSRB/Final_Test/Images/*.ppm
# and GT-final_test.csv (semicolon-separated, ClassId last) beside GTSRB/ or inside it.


def _gtsrb_test_csv(folder: Path) -> Path | None:
    for candidate in (
        folder / "GT-final_test.csv",
        folder / "GTSRB" / "GT-final_test.csv",
        folder / "GTSRB" / "Final_Test" / "Images" / "GT-final_test.csv",
    ):
        if candidate.is_file():
            return candidate
    return None


def _load_gtsrb(folder: Path, info: DatasetInfo, options: dict) -> tuple[ImageData, ImageData]:
    training = folder / "GTSRB" / "Training"
    paths, labels = [], []
    for class_dir in sorted(d for d in training.iterdir() if d.is_dir()):
        files = _images_in(class_dir)
        paths += files
        labels += [int(class_dir.name)] * len(files)
    train = read_images(paths, labels, info.size)
    test_dir = folder / "GTSRB" / "Final_Test" / "Images"
    test_paths, test_labels = [], []
    lines = _gtsrb_test_csv(folder).read_text(encoding="utf-8").strip().splitlines()
    for line in lines[1:]:
        cells = line.strip().split(";")
        test_paths.append(test_dir / cells[0])
        test_labels.append(int(cells[-1]))
    return train, read_images(test_paths, test_labels, info.size)


def _download_gtsrb(root: Path) -> None:
    import torchvision.datasets as tvd

    for split in ("train", "test"):
        tvd.GTSRB(root=str(root), split=split, download=True)


register_dataset(
    DatasetInfo(
        "gtsrb",
        43,
        3,
        (32, 32),
        (0.0, 0.0, 0.0),
        (1.0, 1.0, 1.0),
        crop_padding=4,
        files="GTSRB/Training/000NN/*.ppm, GTSRB/Final_Test/Images/*.ppm and GT-final_test.csv",
    ),
    present=lambda f: (
        (f / "GTSRB" / "Training").is_dir()
        and (f / "GTSRB" / "Final_Test" / "Images").is_dir()
        and _gtsrb_test_csv(f) is not None
    ),
    subfolders=("gtsrb",),
    download=_download_gtsrb,
)(_load_gtsrb)


# Tiny-ImageNet (tiny-imagenet-200/): wnids.txt, train/<wnid>/images/*.JPEG, val/images + val_annotations.txt

TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def _load_tiny(folder: Path, info: DatasetInfo, options: dict) -> tuple[ImageData, ImageData]:
    wnids = [w.strip() for w in (folder / "wnids.txt").read_text().split() if w.strip()]
    index = {w: i for i, w in enumerate(sorted(wnids))}
    paths, labels = [], []
    for wnid in sorted(wnids):
        files = _images_in(folder / "train" / wnid / "images")
        paths += files
        labels += [index[wnid]] * len(files)
    train = read_images(paths, labels, info.size)
    test_paths, test_labels = [], []
    for line in (folder / "val" / "val_annotations.txt").read_text().splitlines():
        cells = line.split("\t")
        if len(cells) >= 2 and cells[1] in index:
            test_paths.append(folder / "val" / "images" / cells[0])
            test_labels.append(index[cells[1]])
    return train, read_images(test_paths, test_labels, info.size)


def _download_tiny(root: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(TINY_URL, download_root=str(root))


register_dataset(
    DatasetInfo(
        "tiny",
        200,
        3,
        (64, 64),
        (0.4802, 0.4481, 0.3975),
        (0.2302, 0.2265, 0.2262),
        crop_padding=4,
        hflip=False,
        files="tiny-imagenet-200/ (wnids.txt, train/, val/)",
    ),
    present=lambda f: (
        (f / "wnids.txt").is_file() and (f / "train").is_dir() and (f / "val" / "val_annotations.txt").is_file()
    ),
    subfolders=("tiny-imagenet-200", "tiny/tiny-imagenet-200"),
    download=_download_tiny,
)(_load_tiny)


# A user's own data: <root>/train/<class>/* and <root>/test/<class>/* ---------------------------------


def _load_imagefolder(folder: Path, info: DatasetInfo, options: dict) -> tuple[ImageData, ImageData]:
    classes = sorted(d.name for d in (folder / "train").iterdir() if d.is_dir())
    test_classes = sorted(d.name for d in (folder / "test").iterdir() if d.is_dir())
    if not classes or not set(test_classes) <= set(classes):
        raise UserError(f"{folder}: train/ must hold one folder per class, and test/ only classes found in train/")
    empty = [c for c in classes if not _images_in(folder / "train" / c)]
    if empty:
        raise UserError(f"{folder}: train/{empty[0]}/ holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    size = options.get("img_size")  # None: every image must already have the same size
    size = (size, size) if isinstance(size, int) else (tuple(size) if size else None)
    splits = []
    for split in ("train", "test"):
        paths, labels = [], []
        for i, c in enumerate(classes):
            files = _images_in(folder / split / c)
            paths += files
            labels += [i] * len(files)
        splits.append(read_images(paths, labels, size))
    train, test = splits
    if size is None and len(test) and train.images.shape[2:] != test.images.shape[2:]:
        raise UserError(
            f"{folder}: train images are {'x'.join(map(str, train.images.shape[2:]))} but test images "
            f"are {'x'.join(map(str, test.images.shape[2:]))}; pass --img_size to resize them"
        )
    return train, test


register_dataset(
    DatasetInfo(
        "imagefolder",
        0,
        3,
        (0, 0),
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        crop_padding=4,
        files="train/<class>/*.png and test/<class>/*.png",
    ),
    present=lambda f: (f / "train").is_dir() and (f / "test").is_dir(),
)(_load_imagefolder)


# digits: scikit-learn's bundled 8x8 digits, the offline default ------------------------------------

DIGITS_SPLIT_SEED = 0


def _load_digits(folder: Path | None, info: DatasetInfo, options: dict) -> tuple[ImageData, ImageData]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, random_state=DIGITS_SPLIT_SEED, stratify=labels
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return (
        ImageData(torch.from_numpy(images[train_idx]), torch.from_numpy(labels[train_idx])),
        ImageData(torch.from_numpy(images[test_idx]), torch.from_numpy(labels[test_idx])),
    )


register_dataset(
    DatasetInfo("digits", 10, 1, (8, 8), (0.5,), (0.5,), crop_padding=1, files="nothing (bundled with scikit-learn)"),
    bundled=True,
)(_load_digits)
