"""Records on disk: the attack record (``attack_result.pt``), defense results, and the
write discipline every output of the project follows.

* Every ``.pt`` file holds only tensors and plain types and loads with
  ``torch.load(weights_only=True)``.
* Files are written to a temporary name in the same folder and renamed; a run's output
  folder is built as ``.<name>.partial`` beside its final place and renamed into place
  when the run has finished, so a killed run leaves the previous complete result or none.
* Records carry SHA-256 digests of the model weights and the backdoor test tensors;
  loading checks them and names the file that changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from utils.errors import UserError

RECORD_FILE = "attack_result.pt"
RECORD_FORMAT = "saubench-attack-record"
RESULT_FORMAT = "saubench-defense-result"
RECORD_VERSION = 1


# -- writing ----------------------------------------------------------------------------------

def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` for a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_torch(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_text(text: str, path: Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_json(obj: Any, path: Path) -> None:
    save_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


def save_png(image: torch.Tensor, path: Path) -> None:
    """A C x H x W image in [0, 1] (1 or 3 channels) as an 8-bit PNG."""
    import cv2

    pixels = (image.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8)
    array = pixels[0].numpy() if pixels.shape[0] == 1 else cv2.cvtColor(pixels.permute(1, 2, 0).numpy(),
                                                                           cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise ValueError(f"cannot encode an image of shape {tuple(image.shape)} as PNG")
    atomic_write(path, lambda tmp: tmp.write_bytes(encoded.tobytes()))


class StagedFolder:
    """An output folder that appears only when complete.

    Files are written under ``<parent>/.<name>.partial``; :meth:`commit` moves the
    finished folder to ``<parent>/<name>`` (replacing an old one only when
    ``overwrite``). A stale ``.partial`` folder of an earlier, killed run is removed
    when a new run starts. Files in ``keep`` that sit in the old folder (for example the
    ``defense/`` results below an attack record) are not carried over: a new record
    invalidates them."""

    def __init__(self, final: Path, overwrite: bool = False):
        self.final = Path(final)
        self.partial = self.final.parent / f".{self.final.name}.partial"
        self.overwrite = overwrite

    def open(self) -> Path:
        if self.final.exists() and not self.overwrite:
            raise UserError(f"{self.final} already exists; pass --overwrite to replace it")
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        return self.partial

    def commit(self) -> Path:
        old = None
        if self.final.exists():
            old = self.final.parent / f".{self.final.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.final, old)
        os.replace(self.partial, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)


# -- names and places ----------------------------------------------------------------------------

def record_dir(record_root: Path, name: str) -> Path:
    """``record_root/name``, refusing names that would leave the record folder."""
    if not name or name.strip() != name:
        raise UserError(f"invalid record name {name!r}")
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or any(p.startswith(".") for p in parts):
        raise UserError(f"record name {name!r} must be a folder name inside {record_root} "
                        "(no absolute paths, '..' or hidden folders)")
    return Path(record_root) / name


def existing_records(record_root: Path) -> list[str]:
    root = Path(record_root)
    if not root.is_dir():
        return []
    return sorted(str(p.parent.relative_to(root)) for p in root.rglob(RECORD_FILE)
                  if not any(part.startswith(".") for part in p.relative_to(root).parts))


# -- digests ----------------------------------------------------------------------------------------

def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# -- the attack record --------------------------------------------------------------------------------

@dataclass
class PoisonedSet:
    """Poisoned samples at rest: uint8 NCHW images, the labels the attacker assigned,
    the true labels, and each sample's index in the clean split it was made from."""

    images: torch.Tensor
    labels: torch.Tensor
    original_labels: torch.Tensor
    indices: torch.Tensor

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError("poisoned images must be a uint8 NCHW tensor")
        for name in ("labels", "original_labels", "indices"):
            t = getattr(self, name)
            if t.dim() != 1 or t.shape[0] != n:
                raise ValueError(f"{name} must be a 1-D tensor of length {n}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"images": self.images, "labels": self.labels.long(),
                "original_labels": self.original_labels.long(), "indices": self.indices.long()}

    @classmethod
    def from_dict(cls, d: Mapping[str, torch.Tensor]) -> "PoisonedSet":
        return cls(d["images"], d["labels"].long(), d["original_labels"].long(), d["indices"].long())


@dataclass
class AttackRecord:
    """Everything a defense needs from an attack, as one typed object.

    ``img_size`` is (H, W, C) as in BackdoorBench. Clean data is not stored: it is
    rebuilt from ``clean_data`` (the dataset name) by :mod:`utils.datasets`."""

    model_name: str
    num_classes: int
    model: dict[str, torch.Tensor]
    img_size: tuple[int, int, int]
    clean_data: str
    attack: str
    attack_params: dict[str, Any]
    poison_indices: torch.Tensor
    bd_test: PoisonedSet
    bd_train: PoisonedSet | None = None
    cross_test: PoisonedSet | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # where it was loaded from (not saved)

    @property
    def in_channels(self) -> int:
        return int(self.img_size[2])

    def build_model(self, state: Mapping[str, torch.Tensor] | None = None, source: str | None = None):
        """The record's architecture with the backdoored weights, or with ``state`` (a
        defense result's weights, masks included)."""
        from utils.models import create_model, load_weights

        model = create_model(self.model_name, self.num_classes, self.in_channels, tuple(self.img_size[:2]),
                             self.mean, self.std)
        where = source or (str(self.path / RECORD_FILE) if self.path is not None else "the record")
        return load_weights(model, dict(self.model if state is None else state), where)

    def to_dict(self) -> dict[str, Any]:
        def opt(s: PoisonedSet | None) -> dict | None:
            return None if s is None else s.to_dict()

        return {
            "format": RECORD_FORMAT, "version": RECORD_VERSION,
            "model_name": self.model_name, "num_classes": int(self.num_classes),
            "model": {k: v.detach().cpu() for k, v in self.model.items()},
            "img_size": [int(v) for v in self.img_size], "clean_data": self.clean_data,
            "attack": self.attack, "attack_params": self.attack_params,
            "poison_indices": self.poison_indices.long().cpu(),
            "bd_train": opt(self.bd_train), "bd_test": opt(self.bd_test), "cross_test": opt(self.cross_test),
            "normalization": {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]},
            "extras": dict(self.extras), "config": self.config,
            "sha256": {"model": tensor_digest(self.model), "bd_test": tensor_digest(self.bd_test.to_dict())},
        }

    def save(self, folder: Path) -> Path:
        path = Path(folder) / RECORD_FILE
        save_torch(self.to_dict(), path)
        return path


def _safe_load(path: Path, what: str) -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into one line."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a bad file
        text = str(exc)
        needs = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if needs:
            raise UserError(f"{path}: this {what} holds a Python object ({needs.group(1)}) that only pickle can "
                            "load; SAU-Bench does not unpickle files") from None
        raise UserError(f"{path}: cannot read this {what}: not a complete torch file (truncated or corrupted?)") from None


def load_record(folder: Path) -> AttackRecord:
    """Read and check ``folder/attack_result.pt``; raises UserError naming what is wrong."""
    folder = Path(folder)
    path = folder / RECORD_FILE
    if not folder.is_dir():
        root = folder.parent
        known = existing_records(root)
        listing = ", ".join(known) if known else "none"
        raise UserError(f"no attack record named '{folder.name}' in {root} (records there: {listing})")
    data = _safe_load(path, "attack record")
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
        raise UserError(f"{path}: not a SAU-Bench attack record (unknown format)")
    if data.get("version") != RECORD_VERSION:
        raise UserError(f"{path}: record version {data.get('version')!r} is not supported "
                        f"(this SAU-Bench reads version {RECORD_VERSION})")
    try:
        record = AttackRecord(
            model_name=data["model_name"], num_classes=int(data["num_classes"]), model=data["model"],
            img_size=tuple(int(v) for v in data["img_size"]), clean_data=data["clean_data"],
            attack=data["attack"], attack_params=dict(data["attack_params"]),
            poison_indices=data["poison_indices"].long(),
            bd_test=PoisonedSet.from_dict(data["bd_test"]),
            bd_train=None if data["bd_train"] is None else PoisonedSet.from_dict(data["bd_train"]),
            cross_test=None if data.get("cross_test") is None else PoisonedSet.from_dict(data["cross_test"]),
            mean=tuple(float(v) for v in data["normalization"]["mean"]),
            std=tuple(float(v) for v in data["normalization"]["std"]),
            extras=dict(data.get("extras") or {}), config=dict(data.get("config") or {}), path=folder)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{path}: malformed attack record ({type(exc).__name__}: {exc})") from None
    digests = data.get("sha256") or {}
    if digests.get("model") != tensor_digest(record.model):
        raise UserError(f"{path}: the model weights do not match their SHA-256 (the file was changed)")
    if digests.get("bd_test") != tensor_digest(record.bd_test.to_dict()):
        raise UserError(f"{path}: the backdoor test set does not match its SHA-256 (the file was changed)")
    return record


# -- defense results --------------------------------------------------------------------------------

def save_defense_result(folder: Path, model_name: str, num_classes: int, model: Mapping[str, torch.Tensor],
                        extras: Mapping[str, torch.Tensor] | None = None) -> Path:
    """``defense_result.pt``: BackdoorBench's keys (model_name, num_classes, model) plus
    the format tag, a digest and the defense's extra tensors (e.g. a pruning mask)."""
    state = {k: v.detach().cpu() for k, v in model.items()}
    path = Path(folder) / "defense_result.pt"
    save_torch({"format": RESULT_FORMAT, "version": RECORD_VERSION, "model_name": model_name,
                "num_classes": int(num_classes), "model": state, "extras": dict(extras or {}),
                "sha256": {"model": tensor_digest(state)}}, path)
    return path


def load_defense_result(path: Path) -> dict[str, Any]:
    path = Path(path)
    data = _safe_load(path, "defense result")
    if not isinstance(data, dict) or data.get("format") != RESULT_FORMAT:
        raise UserError(f"{path}: not a SAU-Bench defense result")
    if (data.get("sha256") or {}).get("model") != tensor_digest(data["model"]):
        raise UserError(f"{path}: the model weights do not match their SHA-256 (the file was changed)")
    return data
