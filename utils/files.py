"""File mechanics every output of the project follows: a file is written to a temporary
name in its folder and renamed (:func:`atomic_write`, and the savers of torch files, text,
JSON and PNG images built on it); a run's output folder is staged as ``.<name>.partial``
beside its final place, under a lock, and renamed into place when complete
(:class:`StagedFolder`); and nothing is written outside the record root
(:func:`inside_root`: paths resolved, symlinks followed). The record formats that use them
are in :mod:`utils.records`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from utils.errors import UserError
from utils.lease import Lease, holder as lease_holder, lock_of

CHECKPOINT_FILE = "checkpoint.pt"  # a run's checkpoint, kept in its staging folder while it runs


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
    except OSError as exc:  # a full or read-only disk: name the file meant, not the temporary one
        if exc.filename is None or exc.filename == str(tmp):
            exc.filename = str(path)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_torch(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: _torch_save(obj, tmp))


def _torch_save(obj: Any, tmp: Path) -> None:
    # through a Python file object: a full disk is then an OSError (ENOSPC) naming the
    # file, where torch's own file writer raises a RuntimeError ("unexpected pos ...")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)


def remove_temporary_files(folder: Path) -> None:
    """Delete the temporary files (``.<name>.*.tmp``) that a killed :func:`atomic_write`
    left in ``folder``; the files they were meant to replace are intact."""
    for tmp in Path(folder).glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink()


def save_text(text: str, path: Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_json(obj: Any, path: Path) -> None:
    save_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def png_bytes(pixels: torch.Tensor) -> bytes:
    """A uint8 C x H x W image (1 or 3 channels, RGB) encoded as an 8-bit PNG, exactly."""
    import cv2

    array = (
        pixels[0].numpy() if pixels.shape[0] == 1 else cv2.cvtColor(pixels.permute(1, 2, 0).numpy(), cv2.COLOR_RGB2BGR)
    )
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise ValueError(f"cannot encode an image of shape {tuple(pixels.shape)} as PNG")
    return encoded.tobytes()


def save_png(image: torch.Tensor, path: Path) -> None:
    """A C x H x W image in [0, 1] (1 or 3 channels) as an 8-bit PNG."""
    pixels = (image.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8)
    encoded = png_bytes(pixels)
    atomic_write(path, lambda tmp: tmp.write_bytes(encoded))


class StagedFolder:
    """An output folder that appears only when complete.

    Files are written under ``<parent>/.<name>.partial``; :meth:`commit` moves the
    finished folder to ``<parent>/<name>`` (replacing an old one only when
    ``overwrite``). A stale ``.partial`` folder of an earlier, killed run is removed
    when a new run starts, unless the run resumes (``open(resume=True)``) and the folder
    holds that run's checkpoint. What the old final folder held (for example the
    ``defense/`` results below an attack record) is not carried over: a new record
    invalidates it.

    One run at a time: :meth:`open` takes ``<parent>/.<name>.lock`` (the process id and
    host of the run, a lease refreshed by a heartbeat: :mod:`utils.lease`) and
    :meth:`commit`, :meth:`discard` and :meth:`release` give it back. A second run on the
    same folder, while the first is alive, stops with one line (naming the lock's full
    path) instead of removing the first one's staging folder; a lock whose process is
    gone (killed) or, for another host's run, whose lease expired is taken over, with a
    warning in the log.

    ``root`` (the record root; default: the folder that holds ``final``): every one of
    these paths must resolve inside it (:func:`inside_root`), so that a symlink planted
    in a record (``defense -> /elsewhere``, ``.<name>.partial -> /elsewhere``) cannot
    send the run's files elsewhere; a resumed staging folder is checked for such links
    too. Refused with one line before anything is written."""

    def __init__(self, final: Path, overwrite: bool = False, root: Path | None = None):
        self.final = Path(final)
        self.partial = self.final.parent / f".{self.final.name}.partial"
        self.old = self.final.parent / f".{self.final.name}.old"
        self.lock = lock_of(self.final)
        self.overwrite = overwrite
        self.root = Path(root) if root is not None else self.final.parent
        self._lease = Lease(self.lock)
        self._created: list[Path] = []  # the folders above the staging folder that this run made
        for path in (self.final, self.partial, self.old, self.lock):  # before anything is moved or written
            inside_root(self.root, path)
        if self.old.is_dir() and not self.final.exists():  # killed between the two renames of commit()
            os.replace(self.old, self.final)

    @property
    def checkpoint(self) -> Path:
        """Where the run's checkpoint is kept while it runs."""
        return self.partial / CHECKPOINT_FILE

    def open(self, resume: bool = False) -> Path:
        """The staging folder, empty, or as an interrupted run left it when ``resume`` and
        it holds a checkpoint (stray temporary files removed)."""
        if self.final.exists() and not self.overwrite:
            if resume:
                raise UserError(
                    f"{self.final} is complete: there is nothing to resume (pass --overwrite to run it again)"
                )
            raise UserError(f"{self.final} already exists; pass --overwrite to replace it")
        try:
            self._acquire()
        except BaseException:
            self._remove_created()
            raise
        try:
            return self._staging(resume)
        except BaseException:
            self.release()
            self._remove_created()
            raise

    def _staging(self, resume: bool) -> Path:
        if self.partial.exists():
            if resume and self.checkpoint.is_file():
                _links_inside(self.root, self.partial)
                remove_temporary_files(self.partial)
                return self.partial
            if self.checkpoint.is_file():
                logging.getLogger("saubench").warning(
                    "discarding the checkpoint of an interrupted run in %s (--resume would continue from it)",
                    self.partial,
                )
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        return self.partial

    def commit(self) -> Path:
        """Move the finished folder into place (without its checkpoint)."""
        if self.checkpoint.exists():
            self.checkpoint.unlink()
        remove_temporary_files(self.partial)
        old = None
        if self.final.exists():
            old = self.old
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.final, old)
        os.replace(self.partial, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.release()
        return self.final

    def discard(self) -> None:
        """Remove the staging folder, and the folders above it that this run made (when
        empty), and give the lock back."""
        shutil.rmtree(self.partial, ignore_errors=True)
        self.release()
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:  # deepest first
            try:
                folder.rmdir()
            except OSError:  # not empty (another run wrote there meanwhile), or gone
                break
        self._created = []

    def _acquire(self) -> None:
        missing = [p for p in (self.final.parent, *self.final.parent.parents) if not p.exists()]
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
        finally:
            self._created = [p for p in missing if p.is_dir()]
        self._lease.acquire(self.final)

    def _holder(self) -> str | None:
        """Who holds the lock, when that run may still be alive; None for a dead one."""
        return lock_holder(self.lock)

    def release(self) -> None:
        """Give the lock back (nothing when this folder does not hold it)."""
        self._lease.release()


def lock_holder(lock: Path) -> str | None:
    """Who holds the StagedFolder lock file ``lock`` while it binds (a live process of this
    host, or another host's run whose lease has not expired: utils.lease); None for a
    free one (or no lock)."""
    return lease_holder(lock)


# -- places ----------------------------------------------------------------------------------------


def inside_root(root: Path, path: Path) -> Path:
    """``path``, after checking that it stays inside ``root`` once both are resolved
    (symlinks followed, ``..`` removed; parts that do not exist yet are taken as
    written). The one check behind every place the project writes under the record
    root: a symlink planted in a record folder (``record/link -> /elsewhere``) cannot
    redirect a write. ``root`` itself may be a symlink. Checks only: creates nothing."""
    path = Path(path)
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))
    if real != real_root and real_root not in real.parents:
        raise UserError(
            f"{path} leads outside the record root {root} (to {real}, through a symlink): SAU-Bench "
            "writes and reads records only inside the record root"
        )
    return path


def _links_inside(root: Path, folder: Path) -> None:
    """Every symlink below ``folder`` (not followed) resolves inside ``root``."""
    for parent, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            entry = Path(parent) / name
            if entry.is_symlink():
                inside_root(root, entry)
