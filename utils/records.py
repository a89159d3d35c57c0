"""Records on disk: the attack record (``attack_result.pt``), defense results, and the
write discipline every output of the project follows.

* Every ``.pt`` file holds only tensors and plain types and loads with
  ``torch.load(weights_only=True)``.
* Files are written as :mod:`utils.files` writes them: to a temporary name in the same
  folder and renamed; a run's output folder is built as ``.<name>.partial`` beside its
  final place and renamed into place when the run has finished, so a killed run leaves
  the previous complete result or none. (Its names are importable from here too.)
* The poisoned sets of a record are :class:`utils.poison.PoisonedSet`.
* Records carry SHA-256 digests of every tensor a defense or the comparison reads (the
  model, bd_test, bd_train, cross_test, poison_indices, extras) and of the record's other
  fields (names, sizes, normalisation, attack_params, config without the keys that say
  where or how the run was made, :data:`LOCATION_KEYS`); loading checks them and names
  the part that changed. Records written before the full set (digests of the model and
  bd_test only) load with a warning; a record holding some of the new digests but not all
  is refused.
* A record's identity (:func:`record_identity`) is the SHA-256 of those digests,
  computed from what was loaded (so also for BackdoorBench's records, which carry no
  digests): attack_summary.json and every defense summary.json name it
  (``record_identity``), a defense writes its result only if the record in place still has
  it (:func:`check_record_unchanged`), and the comparison reuses a result only when it
  matches.
* Every reader's record goes through :func:`check_record` (labels within the classes,
  a sane class count that fits the model's output layer, a normalisation of one finite
  mean and positive std per channel, poisoned samples listed in poison_indices).
* A run's checkpoint (``checkpoint.pt``) lives in its ``.<name>.partial`` folder, so that
  ``--resume`` finds it there and a finished run leaves none behind.
* A file that only pickle can read (a foreign record, an old format) is read only with
  ``trust=True`` (the defense harness's ``--trust_record``); foreign formats plug in as
  readers (:func:`register_record_reader`), which may allow exactly the Python types
  their files hold (torch's safe globals; BackdoorBench's: NumPy arrays, see
  :mod:`utils.backdoorbench`, which registers itself when imported: the defense harness
  imports it) so that those files load without pickle.
* Nothing is written outside the record root: :func:`inside_root` resolves a path
  (symlinks included) and refuses one that leaves the resolved root; :func:`record_dir`
  and :class:`StagedFolder` (its final, staging, lock and old folders) go through it.
* ``defense_result.pt`` holds the weights in the architecture's own key layout (as
  BackdoorBench writes them: no ``net.`` prefix; channel masks as ``masks.<layer>``);
  :func:`load_defense_result` returns them as a Classifier's keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from utils.config import brief, clip
from utils.errors import UserError
from utils.files import inside_root, lock_holder, save_torch
from utils.poison import PoisonedSet

log = logging.getLogger("saubench")

RECORD_FILE = "attack_result.pt"
RECORD_FORMAT = "saubench-attack-record"
RESULT_FORMAT = "saubench-defense-result"
CHECKPOINT_FORMAT = "saubench-checkpoint"
RECORD_VERSION = 1
MAX_CLASSES = 100_000  # a larger class count in a record is refused (a 10**12-way output layer never fits)
MAX_IMAGE_SIDE = 8192
MAX_CHANNELS = 4


# -- defense runs in progress ---------------------------------------------------------------------


def live_defense_locks(record_folder: Path) -> list[tuple[Path, str]]:
    """The locks of defense runs writing into ``record_folder/defense/`` that may still
    be alive: (lock file, holder)."""
    folder = Path(record_folder) / "defense"
    if not folder.is_dir():
        return []
    out = []
    for lock in sorted(folder.glob(".*.lock")):
        holder = lock_holder(lock)
        if holder is not None:
            out.append((lock, holder))
    return out


# -- names and places ----------------------------------------------------------------------------


def record_dir(record_root: Path, name: str) -> Path:
    """``record_root/name``, refusing names that would leave the record folder, literally
    or through a symlink (:func:`inside_root`)."""
    if not name or name.strip() != name:
        raise UserError(f"invalid record name {name!r}")
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or any(p.startswith(".") for p in parts):
        raise UserError(
            f"record name {name!r} must be a folder name inside {record_root} "
            "(no absolute paths, '..' or hidden folders; --result_file also takes the path of a record "
            f"folder that holds {RECORD_FILE}, e.g. /abs/path/badnet_digits)"
        )
    return inside_root(record_root, Path(record_root) / name)


def locate_record(record_root: Path, name: str) -> tuple[Path, str]:
    """Where ``--result_file name`` points: ``(record_root, name)`` when
    ``record_root/name`` holds a record or ``name`` is a plain record name; otherwise,
    when ``name`` is a path (absolute, or relative with a '/') to a folder that holds
    attack_result.pt, ``(its parent, its folder name)``: the record root becomes the
    folder's parent, so what a run writes stays inside it. Anything else is left to
    :func:`record_dir` and :func:`load_record` to refuse or report."""
    path = Path(name)
    plain_name = not path.is_absolute() and "/" not in name and os.sep not in name
    if plain_name or not name or name.strip() != name:
        return Path(record_root), name
    if not path.is_absolute() and ".." not in path.parts and (Path(record_root) / path / RECORD_FILE).is_file():
        return Path(record_root), name  # a record nested in the record root (e.g. <record>/backdoorbench)
    if (path / RECORD_FILE).is_file():
        folder = Path(os.path.abspath(path))
        if folder.name and not folder.name.startswith("."):
            return folder.parent, folder.name
    return Path(record_root), name


def existing_records(record_root: Path) -> list[str]:
    root = Path(record_root)
    if not root.is_dir():
        return []
    return sorted(
        str(p.parent.relative_to(root))
        for p in root.rglob(RECORD_FILE)
        if not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


# -- digests ----------------------------------------------------------------------------------------


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


NO_SET = "none"  # the digest of an absent poisoned set (bd_train, cross_test)
LEGACY_DIGESTS = ("model", "bd_test")  # what records written before the full set carry
NEW_DIGESTS = ("bd_train", "cross_test", "poison_indices", "extras", "fields")
DIGEST_PARTS = {
    "model": "the model weights",
    "bd_test": "the backdoor test set",
    "bd_train": "the poisoned training set (bd_train)",
    "cross_test": "the cross test set (cross_test)",
    "poison_indices": "the poison indices",
    "extras": "the attack's extra tensors (extras)",
    "fields": "the record's fields (names, sizes, normalization, attack_params, config)",
}
# Config keys that say where or how a run was made (folders, names, flags), not what it
# computed: left out of the fields' digest, so that the same run made in two places gives
# the same record identity.
LOCATION_KEYS = ("data_root", "record_root", "save_folder_name", "overwrite", "debug", "download")


def _canonical(value: Any) -> Any:
    """``value`` as JSON-able data that is the same for the same content (keys sorted by
    their repr, tuples as lists, floats and other scalars by repr, tensors by digest)."""
    if isinstance(value, Mapping):
        return {"map": [[repr(k), _canonical(v)] for k, v in sorted(value.items(), key=lambda kv: repr(kv[0]))]}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, torch.Tensor):
        return {"tensor": tensor_digest({"t": value})}
    if isinstance(value, str):
        return value
    return {type(value).__name__: repr(value)}


def fields_digest(record: "AttackRecord") -> str:
    """SHA-256 of a record's fields other than its tensors (the config without
    :data:`LOCATION_KEYS`)."""
    config = {k: v for k, v in record.config.items() if k not in LOCATION_KEYS}
    fields = {
        "model_name": record.model_name,
        "num_classes": int(record.num_classes),
        "img_size": [int(v) for v in record.img_size],
        "clean_data": record.clean_data,
        "attack": record.attack,
        "attack_params": record.attack_params,
        "mean": [float(v) for v in record.mean],
        "std": [float(v) for v in record.std],
        "config": config,
    }
    if record.clean_train:  # absent from older records: their identity stays
        fields["clean_train"] = record.clean_train
    text = json.dumps(_canonical(fields), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def record_digests(record: "AttackRecord") -> dict[str, str]:
    """The SHA-256 of each part of ``record`` (see :data:`DIGEST_PARTS`)."""

    def of(s: "PoisonedSet | None") -> str:
        return NO_SET if s is None else tensor_digest(s.to_dict())

    return {
        "model": tensor_digest(record.model),
        "bd_test": of(record.bd_test),
        "bd_train": of(record.bd_train),
        "cross_test": of(record.cross_test),
        "poison_indices": tensor_digest({"poison_indices": record.poison_indices.long()}),
        "extras": tensor_digest(record.extras),
        "fields": fields_digest(record),
    }


def split_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """SHA-256 of a dataset split (uint8 images and labels): a record's ``clean_train``."""
    return tensor_digest({"images": images, "labels": labels.long()})


def check_clean_train(record: "AttackRecord", images: torch.Tensor, labels: torch.Tensor, where: str) -> None:
    """UserError unless the training split loaded from ``where`` is the one the record was
    made on (when the record says which: its ``clean_train``)."""
    if record.clean_train and split_digest(images, labels) != record.clean_train:
        raise UserError(
            f"{record.path}: the training set in {where} is not the one the record was made on (its "
            f"SHA-256 differs from the record's clean_train_sha256): other files of {record.clean_data}?"
        )


def record_identity(digests: Mapping[str, str]) -> str:
    """A record's identity: SHA-256 over the digests of all its parts (:func:`record_digests`)."""
    text = json.dumps({k: digests[k] for k in sorted(digests)}, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# -- the attack record --------------------------------------------------------------------------------


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
    # SHA-256 of the clean training split the attack was made on (:func:`split_digest`), so that
    # the training set a defender rebuilds (this split + bd_train) is covered; "" in records
    # written before it and in foreign ones
    clean_train: str = ""
    path: Path | None = None  # where it was loaded from (not saved)
    sha256: dict[str, str] = field(default_factory=dict)  # the digests checked when loaded (not saved)
    identity: str = ""  # record_identity(sha256), set when loaded (not saved)
    stamp: tuple[int, int, int] | None = None  # (inode, size, mtime) of the file loaded (not saved)
    legacy: bool = False  # a SAU-Bench record written before the full digests and identities (not saved)

    @property
    def in_channels(self) -> int:
        return int(self.img_size[2])

    def build_model(self, state: Mapping[str, torch.Tensor] | None = None, source: str | None = None):
        """The record's architecture with the backdoored weights, or with ``state`` (a
        defense result's weights, masks included)."""
        from utils.models import create_model, load_weights

        model = create_model(
            self.model_name, self.num_classes, self.in_channels, tuple(self.img_size[:2]), self.mean, self.std
        )
        where = source or (str(self.path / RECORD_FILE) if self.path is not None else "the record")
        return load_weights(model, dict(self.model if state is None else state), where)

    def to_dict(self) -> dict[str, Any]:
        def opt(s: PoisonedSet | None) -> dict | None:
            return None if s is None else s.to_dict()

        return {
            "format": RECORD_FORMAT,
            "version": RECORD_VERSION,
            "model_name": self.model_name,
            "num_classes": int(self.num_classes),
            "model": {k: v.detach().cpu() for k, v in self.model.items()},
            "img_size": [int(v) for v in self.img_size],
            "clean_data": self.clean_data,
            "attack": self.attack,
            "attack_params": self.attack_params,
            "poison_indices": self.poison_indices.long().cpu(),
            "bd_train": opt(self.bd_train),
            "bd_test": opt(self.bd_test),
            "cross_test": opt(self.cross_test),
            "normalization": {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]},
            "extras": dict(self.extras),
            "config": self.config,
            **({"clean_train_sha256": self.clean_train} if self.clean_train else {}),
            "sha256": record_digests(self),
        }

    def compute_identity(self) -> str:
        """This record's identity (:func:`record_identity`), as loading it would give."""
        return record_identity(record_digests(self))

    def save(self, folder: Path) -> Path:
        path = Path(folder) / RECORD_FILE
        save_torch(self.to_dict(), path)
        return path


def _safe_load(
    path: Path, what: str, trust: bool = False, trustable: bool = True, safe_globals: Sequence[Any] = ()
) -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into one line; with
    ``trust``, a file that needs pickle is unpickled (``weights_only=False``);
    ``trustable`` False: a kind of file that is never unpickled (checkpoints).
    ``safe_globals``: Python types the file may hold besides tensors and plain values
    (torch's safe-globals list; ignored by a torch too old to have it)."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty")
    allowed = getattr(torch.serialization, "safe_globals", None)
    try:
        with warnings.catch_warnings():  # a damaged file can make torch warn before it fails
            warnings.simplefilter("ignore")
            if safe_globals and allowed is not None:
                with allowed(list(safe_globals)):
                    return torch.load(path, map_location="cpu", weights_only=True)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a bad file
        text = str(exc)
        needs = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        blocked = re.search(r"unsupported GLOBAL (\S+) whose module (\S+) is blocked", text)
        if blocked:  # os.system and the like: never unpickled, --trust_record or not
            raise UserError(
                f"{path}: this {what} holds a reference to {clip(blocked.group(1), 60)}, from a module "
                f"torch's safe loader blocks ({clip(blocked.group(2), 40)}); no {what} needs it, and "
                "unpickling it could run code: the file is refused"
            ) from None
        if not needs:
            refusal = _weights_only_refusal(text)
            if refusal is not None:
                raise UserError(
                    f"{path}: cannot read this {what}: torch's weights-only loader refused it ({refusal})"
                ) from None
            raise UserError(
                f"{path}: cannot read this {what}: not a complete torch file (truncated or corrupted?)"
            ) from None
        if not trust:
            how = ": pass --trust_record to unpickle it if you trust where it came from" if trustable else ""
            raise UserError(
                f"{path}: this {what} holds a Python object ({needs.group(1)}) that only pickle can "
                "load, and unpickling a file can run any code in it; SAU-Bench's own files never need "
                f"it{how}"
            ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(
            f"{path}: cannot unpickle this {what} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else 'no detail'})"
        ) from None


def _weights_only_refusal(text: str) -> str | None:
    """What torch's weights-only unpickler objected to in a complete file (its
    ``WeightsUnpickler error:`` line), or None when the file is not a complete torch file
    (truncated, corrupted, not a pickle: an unknown opcode)."""
    if "Weights only load failed" not in text or re.search(r"Unsupported operand|truncated|EOF", text):
        return None
    lines = [line.strip() for line in text.splitlines()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1].strip() or next(
                (rest for rest in lines[i + 1 :] if rest), ""
            )
            return clip(reason, 160) if reason else None
    return None


# Readers of foreign record formats: ``reader(data, path)`` gets what ``path`` held and
# returns an AttackRecord when it recognises the format, else None. A reader's module
# imports this one and registers itself; the entry points import the readers they offer
# (BackdoorBench's, utils.backdoorbench: the defense harness, tests/conftest.py), so this
# module imports none of them.
RecordReader = Callable[[Any, Path], "AttackRecord | None"]
RECORD_READERS: list[RecordReader] = []
RECORD_SAFE_GLOBALS: list[Any] = []  # Python types the readers' files may hold (torch's safe globals)


def register_record_reader(reader: RecordReader | None = None, *, safe_globals: Sequence[Any] = ()):
    """Add a reader of a foreign record format to :func:`load_record` (usable as a
    decorator, with or without arguments). ``safe_globals``: the Python types (or
    ``(type, "module.name")`` pairs, torch's form) that files of this format hold and that
    are harmless to rebuild, so that they load with ``weights_only=True``, without
    --trust_record."""

    def add(fn: RecordReader) -> RecordReader:
        if fn not in RECORD_READERS:
            RECORD_READERS.append(fn)
        RECORD_SAFE_GLOBALS.extend(g for g in safe_globals if g not in RECORD_SAFE_GLOBALS)
        return fn

    return add if reader is None else add(reader)


def load_record(folder: Path, trust: bool = False) -> AttackRecord:
    """Read and check ``folder/attack_result.pt``; raises UserError naming what is wrong.

    SAU-Bench's records load with ``weights_only=True``. A file that needs pickle is
    read only with ``trust`` (``--trust_record``); a format other than SAU-Bench's is
    offered to the registered foreign readers (:func:`register_record_reader`)."""
    folder = Path(folder)
    path = folder / RECORD_FILE
    if not path.is_file():
        root = folder.parent
        known = existing_records(root)
        listing = ", ".join(known) if known else "none"
        hint = (
            "; give --record_root DIR (the folder that holds the records) or a path to the record folder "
            f"(e.g. --result_file path/to/{folder.name})"
        )
        if folder.is_dir():
            raise UserError(
                f"{folder} holds no {RECORD_FILE} (records in {root}: {listing}; looked in {folder.resolve()}){hint}"
            )
        raise UserError(
            f"no attack record named '{folder.name}' in {root} (records there: {listing}; looked in "
            f"{folder.resolve()}){hint}"
        )
    data = _safe_load(path, "attack record", trust, safe_globals=RECORD_SAFE_GLOBALS)
    stamp = _stamp(path)  # before reading: a file replaced meanwhile differs from it
    if _tagged(data, "format", RECORD_FORMAT):
        if not _tagged(data, "version", RECORD_VERSION):
            raise UserError(
                f"{path}: record version {brief(data.get('version'))} is not supported "
                f"(this SAU-Bench reads version {RECORD_VERSION})"
            )
        record = _parse_record(data, path, folder)
        _finish(record, path, stamp, own=True)
        return record
    for reader in RECORD_READERS:  # foreign formats are recognised here
        record = reader(data, path)
        if record is not None:
            record.path = folder
            _finish(record, path, stamp, own=False)
            return record
    raise UserError(f"{path}: not a SAU-Bench attack record (unknown format)")


def _finish(record: AttackRecord, path: Path, stamp: tuple[int, int, int] | None, own: bool) -> None:
    """What every reader's record goes through: :func:`check_record`, then its digests
    and identity (from the content read; a reader's own are not trusted) and the stamp
    of its file."""
    try:
        check_record(record)
    except MalformedRecord as exc:
        raise UserError(f"{path}: malformed attack record ({exc})") from None
    if not own or set(record.sha256) != set(DIGEST_PARTS):
        record.sha256 = record_digests(record)
    record.identity = record_identity(record.sha256)
    record.stamp = stamp


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def check_record(record: AttackRecord) -> None:
    """Raise MalformedRecord naming the first field of ``record`` that makes no sense:
    the class count (1..MAX_CLASSES, and the model's output layer's size where it has
    one), the image size, the normalisation (one finite mean and one finite std > 0 per
    channel), labels outside 0..num_classes-1, negative indices, and poisoned training
    samples (bd_train) that poison_indices leaves out."""
    n = record.num_classes
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CLASSES:
        raise MalformedRecord(f"'num_classes' must be an integer in 1..{MAX_CLASSES}, not {brief(n)}")
    check_img_size(record.img_size)
    channels = int(record.img_size[2])
    for key, values in (("normalization.mean", record.mean), ("normalization.std", record.std)):
        if len(values) != channels:
            raise MalformedRecord(f"'{key}' must have one entry per channel ({channels}), not {len(values)}")
        if not all(math.isfinite(v) for v in values):
            raise MalformedRecord(f"'{key}' must be finite, not {brief(list(values))}")
    if not all(v > 0 for v in record.std):
        raise MalformedRecord(f"'normalization.std' must be > 0, not {brief(list(record.std))}")
    head = _output_layer(record.model)
    if head is not None and head[1] != n:
        raise MalformedRecord(f"'num_classes' is {n} but the model's output layer ({head[0]}) has {head[1]} outputs")
    for key in ("bd_test", "bd_train", "cross_test"):
        part = getattr(record, key)
        if part is None:
            continue
        for name in ("labels", "original_labels"):
            t = getattr(part, name)
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
                bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
                raise MalformedRecord(f"'{key}.{name}' holds {bad}, outside 0..{n - 1} (num_classes {n})")
        if part.indices.numel() and int(part.indices.min()) < 0:
            raise MalformedRecord(f"'{key}.indices' holds negative indices")
    poison = record.poison_indices
    if poison.numel() and int(poison.min()) < 0:
        raise MalformedRecord("'poison_indices' holds negative indices")
    if record.bd_train is not None and len(record.bd_train):
        left_out = ~torch.isin(record.bd_train.indices, poison.long())
        if left_out.any():
            raise MalformedRecord(
                f"'poison_indices' leaves out poisoned training samples of bd_train (e.g. "
                f"{int(record.bd_train.indices[left_out][0])})"
            )


def check_img_size(hwc: Sequence[Any]) -> None:
    """``hwc``: (H, W, C) with sides in 1..MAX_IMAGE_SIDE and C in 1..MAX_CHANNELS."""
    ok = len(hwc) == 3 and all(isinstance(v, int) and not isinstance(v, bool) for v in hwc)
    if not ok or not (1 <= hwc[0] <= MAX_IMAGE_SIDE and 1 <= hwc[1] <= MAX_IMAGE_SIDE and 1 <= hwc[2] <= MAX_CHANNELS):
        raise MalformedRecord(
            f"'img_size' must be [H, W, C] with H, W in 1..{MAX_IMAGE_SIDE} and C in "
            f"1..{MAX_CHANNELS}, not {brief(list(hwc) if isinstance(hwc, (list, tuple)) else hwc)}"
        )


def _output_layer(state: Mapping[str, torch.Tensor]) -> tuple[str, int] | None:
    """(name, outputs) of the last 2-D floating-point weight of a state_dict (the
    classifier's output layer in every architecture of utils.models), or None."""
    for name in reversed(list(state)):
        t = state[name]
        if not name.startswith("masks.") and t.dim() == 2 and t.is_floating_point():
            return name, int(t.shape[0])
    return None


def check_record_unchanged(record: AttackRecord, trust: bool = False) -> None:
    """UserError unless the record at ``record.path`` is still the one ``record`` was
    loaded from (same identity): a defense calls it just before it writes its result, so
    that a record replaced meanwhile (``--overwrite``) never receives a result computed
    on the old one."""
    if record.path is None:
        return
    path = record.path / RECORD_FILE
    if record.stamp is not None and _stamp(path) == record.stamp:
        return
    stale = UserError(
        f"{record.path}: the attack record was replaced while this run used it (its identity "
        f"{record.identity[:12]} is gone): the result is not written; run it again on the new record"
    )
    try:
        with _quiet():
            now = load_record(record.path, trust=trust)
    except UserError:
        raise stale from None
    if now.identity != record.identity:
        raise stale


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The 'saubench' logger's info lines held back (a reload says nothing new)."""
    logger = logging.getLogger("saubench")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _tagged(data: Any, key: str, expected: str | int) -> bool:
    """Does the mapping ``data`` hold exactly ``expected`` (a str or an int) at ``key``?"""
    value = data.get(key) if isinstance(data, Mapping) else None
    return type(value) is type(expected) and value == expected


class MalformedRecord(Exception):
    """A field of a record that is missing or of the wrong kind (message: which)."""


_MISSING = object()


def _field(data: Mapping[str, Any], key: str, kinds: type | tuple[type, ...], what: str, optional: bool = False) -> Any:
    value = data.get(key, _MISSING) if isinstance(data, Mapping) else _MISSING
    if value is _MISSING or (value is None and not optional):
        raise MalformedRecord(f"'{key}' is missing" if value is _MISSING else f"'{key}' is null")
    if value is None:
        return None
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise MalformedRecord(f"'{key}' must be {what}, not {type(value).__name__}")
    return value


def _tensor(value: Any, key: str, *, dims: int | None = None, integer: bool = False) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided or value.is_quantized:
        raise MalformedRecord(f"'{key}' must be a dense tensor, not {type(value).__name__}")
    if dims is not None and value.dim() != dims:
        raise MalformedRecord(f"'{key}' must have {dims} dimension(s), not {value.dim()}")
    if integer and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        raise MalformedRecord(f"'{key}' must hold integers, not {value.dtype}")
    return value


def _tensors(value: Any, key: str) -> dict[str, torch.Tensor]:
    if not isinstance(value, Mapping):
        raise MalformedRecord(f"'{key}' must be a mapping of names to tensors, not {type(value).__name__}")
    for name, t in value.items():
        if not isinstance(name, str):
            raise MalformedRecord(f"'{key}' has a key {name!r} that is not a string")
        _tensor(t, f"{key}.{name}")
    return dict(value)


def _numbers(value: Any, key: str) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        raise MalformedRecord(f"'{key}' must be a list of numbers")
    return tuple(float(v) for v in value)


def _poisoned(value: Any, key: str, chw: tuple[int, int, int]) -> PoisonedSet:
    if not isinstance(value, Mapping):
        raise MalformedRecord(f"'{key}' must be a mapping of tensors, not {type(value).__name__}")
    images = _tensor(_field(value, "images", torch.Tensor, "a tensor"), f"{key}.images", dims=4)
    if images.dtype != torch.uint8:
        raise MalformedRecord(f"'{key}.images' must be uint8, not {images.dtype}")
    if tuple(images.shape[1:]) != chw:
        raise MalformedRecord(
            f"'{key}.images' are {'x'.join(map(str, images.shape[1:]))} but img_size says "
            f"{'x'.join(map(str, chw))} (C x H x W)"
        )
    parts = {}
    for name in ("labels", "original_labels", "indices"):
        t = _tensor(_field(value, name, torch.Tensor, "a tensor"), f"{key}.{name}", dims=1, integer=True)
        if t.shape[0] != images.shape[0]:
            raise MalformedRecord(f"'{key}.{name}' holds {t.shape[0]} values for {images.shape[0]} images")
        parts[name] = t.long()
    return PoisonedSet(images, parts["labels"], parts["original_labels"], parts["indices"])


def _parse_record(data: dict[str, Any], path: Path, folder: Path) -> AttackRecord:
    """A SAU-Bench record dict, checked field by field and against its digests."""
    try:
        model_name = _field(data, "model_name", str, "a string")
        num_classes = _field(data, "num_classes", int, "an integer")
        if num_classes < 1:
            raise MalformedRecord(f"'num_classes' must be >= 1, not {num_classes}")
        img_size = _field(data, "img_size", (list, tuple), "a list [H, W, C]")
        if len(img_size) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in img_size):
            raise MalformedRecord(f"'img_size' must be three positive integers [H, W, C], not {brief(img_size)}")
        chw = (img_size[2], img_size[0], img_size[1])
        normalization = _field(data, "normalization", Mapping, "a mapping with mean and std")
        bd_train = _field(data, "bd_train", Mapping, "a mapping of tensors", optional=True)
        cross_test = data.get("cross_test")
        record = AttackRecord(
            model_name=model_name,
            num_classes=num_classes,
            model=_tensors(_field(data, "model", Mapping, "a state_dict"), "model"),
            img_size=tuple(img_size),
            clean_data=_field(data, "clean_data", str, "a dataset name"),
            attack=_field(data, "attack", str, "an attack name"),
            attack_params=dict(_field(data, "attack_params", Mapping, "a mapping")),
            poison_indices=_tensor(
                _field(data, "poison_indices", torch.Tensor, "a tensor"), "poison_indices", dims=1, integer=True
            ).long(),
            bd_test=_poisoned(_field(data, "bd_test", Mapping, "a mapping of tensors"), "bd_test", chw),
            bd_train=None if bd_train is None else _poisoned(bd_train, "bd_train", chw),
            cross_test=None if cross_test is None else _poisoned(cross_test, "cross_test", chw),
            mean=_numbers(normalization.get("mean"), "normalization.mean"),
            std=_numbers(normalization.get("std"), "normalization.std"),
            extras=_tensors(data.get("extras") or {}, "extras"),
            config=dict(_field(data, "config", Mapping, "a mapping", optional=True) or {}),
            clean_train=_field(data, "clean_train_sha256", str, "a digest") if "clean_train_sha256" in data else "",
            path=folder,
        )
        digests = _field(data, "sha256", Mapping, "a mapping of digests")
    except MalformedRecord as exc:
        raise UserError(f"{path}: malformed attack record ({exc})") from None
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise UserError(f"{path}: malformed attack record ({type(exc).__name__}: {exc})") from None
    record.sha256 = record_digests(record)
    for key in LEGACY_DIGESTS:
        if not _tagged(digests, key, record.sha256[key]):
            raise _changed(path, key)
    present = [key for key in NEW_DIGESTS if key in digests]
    if not present:
        record.legacy = True
        log.warning(
            "%s: written before records carried digests of every tensor: only the model and the backdoor "
            "test set are checked (re-run the attack to cover the rest)",
            path,
        )
    elif len(present) < len(NEW_DIGESTS):
        missing = [key for key in NEW_DIGESTS if key not in digests]
        raise UserError(
            f"{path}: malformed attack record ('sha256' lacks the digests of {', '.join(missing)}: "
            "a record carries all of them or, written before them, none)"
        )
    for key in present:
        if not _tagged(digests, key, record.sha256[key]):
            raise _changed(path, key)
    return record


def _changed(path: Path, key: str) -> UserError:
    plural = key in ("model", "poison_indices", "extras", "fields")
    verb, pronoun = ("do", "their") if plural else ("does", "its")
    return UserError(f"{path}: {DIGEST_PARTS[key]} {verb} not match {pronoun} SHA-256 (the file was changed)")


# -- defense results --------------------------------------------------------------------------------

BARE_LAYOUT = "backdoorbench"  # defense_result.pt's "layout": weights keyed as the architecture's own


def save_defense_result(
    folder: Path,
    model_name: str,
    num_classes: int,
    model: Mapping[str, torch.Tensor],
    extras: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """``defense_result.pt``: BackdoorBench's keys (model_name, num_classes, model: the
    weights in the architecture's key layout, so that BackdoorBench's
    ``generate_cls_model(...).load_state_dict`` takes them) plus the format tag, the
    layout, a digest and the defense's extra tensors (e.g. a pruning mask)."""
    from utils.models import bare_state

    state = bare_state({k: v.detach().cpu() for k, v in model.items()})
    path = Path(folder) / "defense_result.pt"
    save_torch(
        {
            "format": RESULT_FORMAT,
            "version": RECORD_VERSION,
            "model_name": model_name,
            "num_classes": int(num_classes),
            "model": state,
            "layout": BARE_LAYOUT,
            "extras": dict(extras or {}),
            "sha256": {"model": tensor_digest(state)},
        },
        path,
    )
    return path


def load_defense_result(path: Path, trust: bool = False) -> dict[str, Any]:
    """A result written by :func:`save_defense_result`, checked; ``model`` holds a
    Classifier's keys (``net.*``, ``masks.*``) whatever layout the file has."""
    from utils.models import classifier_state

    path = Path(path)
    data = _safe_load(path, "defense result", trust)
    if not _tagged(data, "format", RESULT_FORMAT):
        raise UserError(f"{path}: not a SAU-Bench defense result")
    try:
        model = _tensors(data.get("model"), "model")
        _tensors(data.get("extras") or {}, "extras")
        digests = _field(data, "sha256", Mapping, "a mapping of digests")
    except MalformedRecord as exc:
        raise UserError(f"{path}: malformed defense result ({exc})") from None
    if not _tagged(digests, "model", tensor_digest(model)):
        raise UserError(f"{path}: the model weights do not match their SHA-256 (the file was changed)")
    if _tagged(data, "layout", BARE_LAYOUT):  # results written before it kept a Classifier's keys
        data["model"] = classifier_state(model)
    return data


# -- checkpoints ----------------------------------------------------------------------------------------


def save_checkpoint(state: Mapping[str, Any], path: Path) -> None:
    """Write a run's checkpoint atomically; Ctrl-C waits until it is in place."""
    from utils.runtime import deferred_interrupts

    with deferred_interrupts():
        save_torch({"format": CHECKPOINT_FORMAT, "version": RECORD_VERSION, **state}, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint` (weights_only)."""
    data = _safe_load(Path(path), "checkpoint", trustable=False)
    if not _tagged(data, "format", CHECKPOINT_FORMAT):
        raise UserError(f"{path}: not a SAU-Bench checkpoint")
    if not _tagged(data, "version", RECORD_VERSION):
        raise UserError(f"{path}: checkpoint version {brief(data.get('version'))} is not supported")
    return data


def checkpoint_epoch(path: Path) -> int | None:
    """The epoch a readable checkpoint at ``path`` was saved after, else None."""
    try:
        epoch = load_checkpoint(path).get("epoch") if Path(path).is_file() else None
    except UserError:
        return None
    return epoch if isinstance(epoch, int) else None
