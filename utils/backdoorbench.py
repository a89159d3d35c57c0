"""BackdoorBench's record layout: read its attack records as SAU-Bench records, write ours
in its layout, and find the results its defenses left in a record.

BackdoorBench (Wu et al., NeurIPS 2022 Datasets and Benchmarks; SCLBD/BackdoorBench)
saves an attack as ``record/<name>/attack_result.pt`` (``torch.save`` of a dict):
model_name, num_classes, model (a CPU state_dict, with ``module.`` prefixes when the
model was trained under DataParallel), data_path (e.g. ``./data/cifar10``), img_size (H,
W, C), clean_data (the dataset's name), bd_train (None for some attacks) and bd_test.
bd_train and bd_test are the state of its poisoned-dataset class:

* ``poison_indicator``: a NumPy 0/1 array over the whole split;
* ``original_index_array``: the indices the dataset shows (bd_test: the non-target test
  samples);
* ``bd_data_container``: ``save_folder_path``, ``save_file_format`` (".png") and
  ``data_dict``, which maps a sample's index to ``{"path": ".../<original label>/<index>.png",
  "other_info": [backdoor label, original label]}``;
* ``getitem_all``, ``getitem_all_switch``, ``save_folder_path``.

The poisoned images are PNG files in ``bd_train_dataset/`` and ``bd_test_dataset/`` of the
record (and ``cross_test_dataset/`` for WaNet and Input-Aware, not named in the dict).
Clean data is not in the record; it is rebuilt from the dataset's name, read from
``--data_root`` (default ./data; never a folder the record names or sits beside). Its
models take normalised inputs (:data:`NORMALIZATION`, its ``get_dataset_normalization``), so the
reader builds our model of the same name with that normalisation as its first layer: our
[0, 1] convention holds and the network computes what BackdoorBench's did.

Reading needs only NumPy's array, scalar and dtype types besides tensors: they are
allowed by torch's safe-globals mechanism (:data:`SAFE_GLOBALS`), so a BackdoorBench
record loads with ``weights_only=True`` and needs no --trust_record unless it holds
other Python objects (then the harness says which one).

Writing (``--export_backdoorbench`` of the attack harness): :func:`export_record` writes
``<record>/backdoorbench/`` in that layout, with paths in ``data_dict`` relative to a
BackdoorBench checkout (``./record/<name>/backdoorbench/...``).
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from utils.errors import UserError
from utils.history import cell_number
from utils.files import StagedFolder, png_bytes, save_torch
from utils.poison import PoisonedSet
from utils.records import AttackRecord, MalformedRecord, check_img_size, register_record_reader

log = logging.getLogger("saubench")

# BackdoorBench's get_dataset_normalization (utils/aggregate_block/dataset_and_transform_generate.py).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.5,), (0.5,)),
    "tiny": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "gtsrb": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "celeba": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
KEYS = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test")
FOLDERS = {"bd_train": "bd_train_dataset", "bd_test": "bd_test_dataset", "cross_test": "cross_test_dataset"}
EXPORT_FOLDER = "backdoorbench"  # where --export_backdoorbench writes, inside our record
SOURCE = "backdoorbench"  # the ``attack`` and ``config["source"]`` of a record read from this layout


def _numpy_globals() -> list[Any]:
    """NumPy's array, scalar and dtype types under the names files of NumPy 1.x
    (``numpy.core``) and 2.x (``numpy._core``) give them."""
    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    dtypes = getattr(np, "dtypes", None)
    classes = [c for c in vars(dtypes).values() if isinstance(c, type) and issubclass(c, np.dtype)] if dtypes else []
    out: list[Any] = [np.ndarray, np.dtype, *classes]
    for fn in (multiarray._reconstruct, multiarray.scalar):
        out += [(fn, f"numpy.core.multiarray.{fn.__name__}"), (fn, f"numpy._core.multiarray.{fn.__name__}")]
    return out


SAFE_GLOBALS = _numpy_globals()


# -- reading -----------------------------------------------------------------------------------


def is_backdoorbench(data: Any) -> bool:
    """Does ``data`` (what an attack_result.pt held) have BackdoorBench's keys (and not
    SAU-Bench's format tag)?"""
    return isinstance(data, Mapping) and all(k in data for k in KEYS) and "format" not in data


@register_record_reader(safe_globals=SAFE_GLOBALS)
def read_backdoorbench(data: Any, path: Path) -> AttackRecord | None:
    """A BackdoorBench attack record as an :class:`AttackRecord` (None for other formats);
    says in one log line what it read."""
    if not is_backdoorbench(data):
        return None
    folder = Path(path).parent
    try:
        record, notes = _parse(data, folder)
    except MalformedRecord as exc:
        raise UserError(f"{path}: malformed BackdoorBench record ({exc})") from None
    h, w, c = record.img_size
    poisoned = (
        f"{len(record.bd_train)} poisoned training images"
        if record.bd_train is not None
        else "no bd_train (the attack poisons while training)"
    )
    cross = f", {len(record.cross_test)} cross test images" if record.cross_test is not None else ""
    log.info(
        "BackdoorBench record %s: %s on %s (%dx%dx%d, %d classes), %s, %d backdoor test images%s from PNG; "
        "inputs normalised with mean %s std %s%s",
        folder,
        record.model_name,
        record.clean_data,
        h,
        w,
        c,
        record.num_classes,
        poisoned,
        len(record.bd_test),
        cross,
        _short(record.mean),
        _short(record.std),
        "".join(f"; {n}" for n in notes),
    )
    return record


def _short(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _integer(value: Any, key: str) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        and not (isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point())
    ):
        raise MalformedRecord(f"'{key}' must be an integer, not {type(value).__name__}")
    return int(value)


def normalization(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """BackdoorBench's mean and std of ``dataset``; for a dataset it does not know
    (digits, a record we exported), our dataset's own."""
    if dataset in NORMALIZATION:
        return NORMALIZATION[dataset]
    from utils.datasets import dataset_info

    info = dataset_info(dataset)  # UserError naming the known datasets
    return info.mean, info.std


def _parse(data: Mapping[str, Any], folder: Path) -> tuple[AttackRecord, list[str]]:
    from utils.models import DATA_PARALLEL_PREFIX, classifier_state, model_spec

    notes = []
    model_name = data["model_name"]
    if not isinstance(model_name, str):
        raise MalformedRecord(f"'model_name' must be a string, not {type(model_name).__name__}")
    try:
        model_spec(model_name)
    except UserError as exc:
        raise MalformedRecord(f"{exc}: SAU-Bench has no architecture of that name") from None
    num_classes = _integer(data["num_classes"], "num_classes")
    img_size = data["img_size"]
    if not isinstance(img_size, (list, tuple)) or len(img_size) != 3:
        raise MalformedRecord(f"'img_size' must be (H, W, C), not {img_size!r}")
    hwc = tuple(_integer(v, "img_size") for v in img_size)
    check_img_size(hwc)  # before any image is read at that size
    clean_data = data["clean_data"]
    if not isinstance(clean_data, str):
        raise MalformedRecord(f"'clean_data' must be a dataset name, not {type(clean_data).__name__}")
    try:
        mean, std = normalization(clean_data)
    except UserError as exc:
        raise MalformedRecord(f"dataset {exc}") from None
    weights = data["model"]
    if not isinstance(weights, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise MalformedRecord("'model' must be a state_dict (names to tensors)")
    if any(k.startswith(DATA_PARALLEL_PREFIX) for k in weights):
        notes.append("DataParallel's 'module.' prefixes removed")
    bd_test, _ = _poisoned_set(data["bd_test"], "bd_test", folder, hwc, shown_only=True)
    bd_train, poison_indices = None, torch.zeros(0, dtype=torch.long)
    if data["bd_train"] is not None:
        bd_train, poison_indices = _poisoned_set(data["bd_train"], "bd_train", folder, hwc, shown_only=False)
    cross_test = _cross_test(folder / FOLDERS["cross_test"], hwc)
    # data_path is kept as information only: a record never chooses where clean data is read from
    config: dict[str, Any] = {"source": SOURCE, "data_path": str(data["data_path"])}
    record = AttackRecord(
        model_name=model_name,
        num_classes=num_classes,
        model=classifier_state(weights),
        img_size=hwc,
        clean_data=clean_data,
        attack=SOURCE,
        attack_params={},
        poison_indices=poison_indices,
        bd_test=bd_test,
        bd_train=bd_train,
        cross_test=cross_test,
        mean=tuple(mean),
        std=tuple(std),
        config=config,
        path=folder,
    )
    return record, notes  # checked, digested and given its identity by load_record (utils.records)


def _array(value: Any, key: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.numpy()
    try:
        array = np.asarray(value).reshape(-1)
    except (TypeError, ValueError):
        raise MalformedRecord(f"'{key}' must be an array, not {type(value).__name__}") from None
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise MalformedRecord(f"'{key}' must be a numeric array, not {array.dtype}")
    return array


def _poisoned_set(
    state: Any, key: str, folder: Path, hwc: tuple[int, ...], shown_only: bool
) -> tuple[PoisonedSet, torch.Tensor]:
    """The poisoned samples of one of BackdoorBench's dataset states, read from their PNG
    files, and the indices its poison_indicator marks. ``shown_only``: only the samples
    its original_index_array shows, in that order (bd_test); otherwise every poisoned
    sample in index order (bd_train)."""
    from utils.datasets import read_images

    if not isinstance(state, Mapping):
        raise MalformedRecord(f"'{key}' must be a dataset state (a mapping), not {type(state).__name__}")
    if "x" in state and "poison_indicator" not in state:
        raise MalformedRecord(
            f"'{key}' is in BackdoorBench 1.x's layout (x, y tensors, no original labels), "
            "which is not read; re-run the attack with BackdoorBench 2"
        )
    for part in ("poison_indicator", "original_index_array", "bd_data_container"):
        if part not in state:
            raise MalformedRecord(f"'{key}.{part}' is missing")
    indicator = _array(state["poison_indicator"], f"{key}.poison_indicator") == 1
    shown = _array(state["original_index_array"], f"{key}.original_index_array").astype(np.int64)
    container = state["bd_data_container"]
    if not isinstance(container, Mapping) or not isinstance(container.get("data_dict"), Mapping):
        raise MalformedRecord(f"'{key}.bd_data_container' must hold a data_dict")
    if container.get("save_file_format", ".png") != ".png":
        raise MalformedRecord(f"'{key}' images are saved as {container.get('save_file_format')!r}; only .png is read")
    if container.get("save_folder_path") is None and container["data_dict"]:
        raise MalformedRecord(f"'{key}' keeps its images inside the file (an in-memory container), not as PNG files")
    if len(shown) and (shown.min() < 0 or shown.max() >= len(indicator)):
        raise MalformedRecord(f"'{key}.original_index_array' points outside its poison_indicator")
    poisoned = np.flatnonzero(indicator)
    indices = shown[indicator[shown]] if shown_only else poisoned
    if shown_only and len(indices) < len(shown):
        log.warning(
            "%s: %d samples of %s are not poisoned; only its %d poisoned ones are used",
            folder,
            len(shown) - len(indices),
            key,
            len(indices),
        )
    entries = {}
    for k, v in container["data_dict"].items():
        entries[_integer(k, f"{key}.data_dict")] = v
    paths, labels, original = [], [], []
    for i in indices.tolist():
        entry = entries.get(i)
        if not isinstance(entry, Mapping) or "path" not in entry or len(entry.get("other_info") or ()) < 2:
            raise MalformedRecord(
                f"'{key}' marks sample {i} as poisoned but its data_dict has no "
                "{path, other_info: [bd_label, label]} for it"
            )
        paths.append(_image_file(folder, str(entry["path"]), key, i))
        labels.append(_integer(entry["other_info"][0], f"{key} label"))
        original.append(_integer(entry["other_info"][1], f"{key} original label"))
    h, w, c = hwc
    images = read_images(paths, labels, (h, w), c).images
    return (
        PoisonedSet(
            images,
            torch.tensor(labels, dtype=torch.long),
            torch.tensor(original, dtype=torch.long),
            torch.from_numpy(indices.copy()),
        ),
        torch.from_numpy(poisoned.astype(np.int64)),
    )


def _image_file(folder: Path, stored: str, key: str, index: int) -> Path:
    """A data_dict path (``<anything>/<folder>/<label>/<index>.png``, written wherever
    BackdoorBench ran) found inside the record folder."""
    parts = [p for p in re.split(r"[\\/]", stored) if p]
    if len(parts) < 3 or ".." in parts[-3:]:
        raise MalformedRecord(f"'{key}' sample {index} has the path {stored!r}, not <folder>/<label>/<index>.png")
    path = folder.joinpath(*parts[-3:])
    if not path.is_file():
        raise UserError(
            f"{path}: missing ({key} sample {index} of the BackdoorBench record in {folder}; its "
            f"data_dict says {stored})"
        )
    return path


def _cross_test(folder: Path, hwc: tuple[int, ...]) -> PoisonedSet | None:
    """WaNet's and Input-Aware's cross (noise-mode) test images, which BackdoorBench
    keeps only as files: ``cross_test_dataset/<label>/<index>.png``, true labels."""
    from utils.datasets import read_images

    if not folder.is_dir():
        return None
    found = sorted(
        (int(p.stem), int(p.parent.name), p)
        for p in folder.glob("*/*.png")
        if p.stem.isdigit() and p.parent.name.isdigit()
    )
    if not found:
        return None
    h, w, c = hwc
    labels = torch.tensor([label for _, label, _ in found], dtype=torch.long)
    images = read_images([p for _, _, p in found], labels.tolist(), (h, w), c).images
    return PoisonedSet(images, labels, labels.clone(), torch.tensor([i for i, _, _ in found], dtype=torch.long))


# -- writing -------------------------------------------------------------------------------------


def export_record(
    record: AttackRecord, folder: Path, name: str, train_size: int, test_size: int, overwrite: bool = False
) -> Path:
    """Write ``record`` in BackdoorBench's layout to ``folder`` (which appears only when
    complete): attack_result.pt and the PNG folders. ``name``: the folder's path below a
    BackdoorBench checkout's ``record/``, which the paths in its data_dicts start from;
    ``train_size``/``test_size``: the sizes of the clean splits (its poison_indicators
    cover them)."""
    from utils.models import bare_state

    out = StagedFolder(Path(folder), overwrite)
    staging = out.open()
    try:
        base = f"./record/{name}"
        bd_train = None
        if record.bd_train is not None:
            bd_train = _dataset_state(
                record.bd_train, staging, base, "bd_train", train_size, shown=np.arange(train_size)
            )
        bd_test = _dataset_state(
            record.bd_test, staging, base, "bd_test", test_size, shown=record.bd_test.indices.numpy().astype(np.int64)
        )
        if record.cross_test is not None:
            _write_pngs(record.cross_test, staging / FOLDERS["cross_test"])
        h, w, c = record.img_size
        save_torch(
            {
                "model_name": record.model_name,
                "num_classes": int(record.num_classes),
                "model": bare_state({k: v.detach().cpu() for k, v in record.model.items()}),
                "data_path": f"./data/{record.clean_data}",
                "img_size": (int(h), int(w), int(c)),
                "clean_data": record.clean_data,
                "bd_train": bd_train,
                "bd_test": bd_test,
            },
            staging / "attack_result.pt",
        )
    except BaseException:
        out.discard()
        raise
    return out.commit()


def _dataset_state(
    data: PoisonedSet, staging: Path, base: str, key: str, size: int, shown: np.ndarray
) -> dict[str, Any]:
    """The state of BackdoorBench's poisoned dataset for ``data`` (PNG files written)."""
    sub = FOLDERS[key]
    indicator = np.zeros(size, dtype=np.int64)
    indicator[data.indices.numpy()] = 1
    files = _write_pngs(data, staging / sub)
    data_dict = {
        int(i): {"path": f"{base}/{sub}/{rel}", "other_info": [int(y), int(y0)]}
        for i, y, y0, rel in zip(data.indices.tolist(), data.labels.tolist(), data.original_labels.tolist(), files)
    }
    container = {"save_folder_path": f"{base}/{sub}", "data_dict": data_dict, "save_file_format": ".png"}
    return {
        "bd_data_container": container,
        "getitem_all": True,
        "getitem_all_switch": False,
        "original_index_array": shown,
        "poison_indicator": indicator,
        "save_folder_path": f"{base}/{sub}",
    }


def _write_pngs(data: PoisonedSet, folder: Path) -> list[str]:
    """``folder/<original label>/<index>.png`` for each image (uint8, exact); returns the
    paths relative to ``folder``. Plain writes: the export is staged as a whole."""
    rel = []
    for image, label, index in zip(data.images, data.original_labels.tolist(), data.indices.tolist()):
        path = folder / str(label) / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(image))
        rel.append(f"{label}/{index}.png")
    return rel


# -- BackdoorBench's own defense results --------------------------------------------------------------


def defense_results(record_folder: Path) -> list[tuple[str, dict[str, float | None]]]:
    """(folder name, final C-Acc/ASR/RA as fractions) of each result that BackdoorBench's
    defenses wrote in ``<record>/defense/<name>/`` (a ``*_df_summary.csv`` or ``*_df.csv``
    without our summary.json), from the last row that has them."""
    out = []
    root = Path(record_folder) / "defense"
    if not root.is_dir():
        return out
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (sub / "summary.json").exists():
            continue  # ours
        metrics = _last_metrics(sorted(sub.glob("*_df_summary.csv")), summary=True) or _last_metrics(
            sorted(p for p in sub.glob("*_df.csv")), summary=False
        )
        if metrics is not None:
            out.append((sub.name, metrics))
    return out


def _last_metrics(paths: Sequence[Path], summary: bool) -> dict[str, float | None] | None:
    for path in paths:
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        except (OSError, UnicodeDecodeError, csv.Error):
            continue
        if summary:
            rows = [r for r in rows if r.get("") == "last"]
        for row in reversed(rows):
            values = {
                key: cell_number(row.get(column))
                for key, column in (("clean_acc", "test_acc"), ("asr", "test_asr"), ("ra", "test_ra"))
            }
            if values["clean_acc"] is not None:
                return values
    return None
