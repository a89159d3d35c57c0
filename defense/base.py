"""The defense harness: the Defense base class, its registry, and ``run``, the one
function behind every ``python defense/<name>.py``.

``run`` loads the attack record, draws the defender's clean subset from the clean
training set (seeded, the clean versions of the images; the indices are saved), evaluates the
backdoored model, calls ``Defense.mitigate(model, data)``, evaluates the purified model
with the same code for every defense, and writes ``record/<result_file>/defense/<name>/``
(or ``defense/<result_name>/`` with ``--result_name``, e.g. one folder per seed):
defense_result.pt, <name>_df.csv, <name>_df_summary.csv, summary.json, index.txt,
<name>.log and <name>_plot.png. The folder appears only when the run has finished; an
existing one is kept unless ``--overwrite``.

The files BackdoorBench's defenses write have its names and columns, so its analysis
scripts read ours: defense_result.pt holds model_name, num_classes and model (the
architecture's keys), <name>_df.csv has an unnamed index column, then epoch and
BackdoorBench's six metric columns, then the defense's own numbers (losses, rates), and
<name>_df_summary.csv its summary (rows last, valid_max, exist_nan_value). The last row
of <name>_df.csv always holds the returned model's metrics: when the last reported epoch
did not evaluate that model (nothing reported, an epoch left out by --eval_every, a
defense that changes the model after its last report), a row without an epoch is added.
The attack record may be BackdoorBench's own (utils/backdoorbench.py reads it).

A defense sees only the defender's data (:class:`DefenseData`): its clean subset, the
dataset's declared transforms and the device. It reports progress through
``data.report(epoch, model, **losses)``; the harness decides when to evaluate, on test
data the defense never sees.
A training-time defense (``kind`` training_time, defense/training.py) sees instead the
training set as delivered and the attack's training recipe, trains its own model, and is
evaluated and written the same way; the detectors' kinds are run by ``_detect``.

Tuning (``python -m defense tune``, defense/tune.py) reads a validation split the harness
cuts from what the defender holds (:func:`validation_split`): part of the clean subset for
C-Acc and the record's poisoned *training* images for ASR; never the test sets.

Checkpoints and ``--resume``: a defense's epoch loop becomes resumable when it is written
``for epoch in data.epochs(n, model=..., optimizer=..., scheduler=..., generator=...)``
(``data.resume`` alone, before a hand-made loop, still works); ``data.report`` then also
saves a checkpoint (those objects, the gradient scaler of ``data.step``, the random
states, the history rows) every ``--save_every`` epochs and after the last, in the
result's staging folder. With ``--resume`` the run
goes on after the saved epoch and ends, on the same device with the same seed, with
exactly the weights and the <name>_df.csv rows of an uninterrupted run. Work done before
the loop (a teacher, a pruning step, a trigger search) is done again on resume,
from the same seed; a defense that never calls it restarts from the beginning.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn

import utils.backdoorbench  # noqa: F401  (registers the reader of BackdoorBench's records)
from utils import config as cfg
from utils.cli import entry, guarded, python_call
from utils.config import Layer, Param
from utils.datasets import Dataset, DatasetInfo, ImageData, load_dataset, train_transform
from utils.errors import UserError
from utils.history import History
from utils.metrics import COLUMNS as METRIC_COLUMNS, Metrics, closing_text, der, detection_text, evaluate
from utils.models import Classifier
from utils.files import StagedFolder, read_json, save_json, save_png, save_text
from utils.poison import PoisonedSet
from utils.provenance import provenance
from utils.records import (
    AttackRecord,
    check_clean_train,
    check_record_unchanged,
    load_record,
    load_defense_result,
    locate_record,
    record_dir,
    save_defense_result,
)
from utils.registry import Method, Registry
from utils.runtime import (
    autocast,
    check_data_root,
    check_record_root,
    grad_scaler,
    held_logs,
    log_to,
    progress,
    replay,
    resolve_device,
    seed_everything,
    sign_scale,
)
from utils.train import Checkpoint, batches, check_all_finite, check_finite, first_non_finite, predict

log = logging.getLogger("saubench")


# -- what a defense sees -------------------------------------------------------------------------


def _model_signature(model: nn.Module) -> tuple:
    """What, besides its tensors, decides what ``model`` computes: its modules (names and
    types) and the hooks installed on them."""
    return tuple(
        (name, type(m), tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()
    )


def _model_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``model`` (non-persistent buffers such as pruning
    masks included)."""
    return [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]


class Monitor:
    """Collects one row per reported epoch and evaluates the model every ``eval_every``
    epochs and at ``last_epoch``, with the harness's evaluation.

    :meth:`evaluate` reuses the last evaluation when asked again about the same model
    unchanged: same object, same modules and hooks, and every parameter and buffer equal
    (``torch.equal`` against a copy kept from that evaluation): an exact check, so a
    defense that changes its model after its last report is evaluated again."""

    def __init__(self, evaluate_fn: Callable[[nn.Module], Metrics], eval_every: int = 1, last_epoch: int | None = None):
        self.evaluate_fn = evaluate_fn
        self.eval_every = eval_every
        self.last_epoch = last_epoch
        self.history = History()
        self.eval_seconds = 0.0
        self._last: tuple[int, tuple, list[tuple[str, torch.Tensor]], Metrics] | None = None
        self._bar: Any = None  # the epochs' progress bar, from the first report to the last epoch
        self.undeclared_last_epoch: int | None = None  # used when no data.epochs(n) declared the loop

    def evaluate(self, model: nn.Module) -> Metrics:
        """The harness's metrics of ``model``, reused when ``model`` has not changed since
        the last evaluation."""
        signature = _model_signature(model)
        tensors = _model_tensors(model)
        if self._last is not None:
            ident, last_signature, last_tensors, metrics = self._last
            if (
                ident == id(model)
                and last_signature == signature
                and len(last_tensors) == len(tensors)
                and all(
                    n == m and a.dtype == b.dtype and a.shape == b.shape and a.device == b.device and torch.equal(a, b)
                    for (n, a), (m, b) in zip(tensors, last_tensors)
                )
            ):
                return metrics
        metrics = self.evaluate_fn(model)
        self._last = (id(model), signature, [(n, t.detach().clone()) for n, t in tensors], metrics)
        return metrics

    def report(self, epoch: int, model: nn.Module, **values: float) -> None:
        if self.last_epoch is None and self.undeclared_last_epoch is not None:
            self.last_epoch, self.undeclared_last_epoch = self.undeclared_last_epoch, None
        row = self.history.add(epoch=epoch, **{k: float(v) for k, v in values.items()})
        if self._bar is None and self.last_epoch is not None and epoch < self.last_epoch:
            self._bar = progress(desc="epochs", total=self.last_epoch + 1, unit="epoch", delay=0.0)
        if self._bar is not None:
            self._bar.update(epoch + 1 - self._bar.n)
            if epoch >= self.last_epoch:
                self._bar.close()
                self._bar = None
        if (epoch + 1) % self.eval_every == 0 or epoch == self.last_epoch:
            start = time.perf_counter()
            metrics = self.evaluate(model)
            self.eval_seconds += time.perf_counter() - start
            row.update(metrics.as_row())
            shown = "  ".join(f"{k} {v:.4f}" for k, v in values.items())
            log.info(
                "epoch %d: %s  C-Acc %.4f  ASR %.4f  RA %.4f", epoch, shown, metrics.clean_acc, metrics.asr, metrics.ra
            )


@dataclass
class Outputs:
    """What a method hands the harness besides its model (or its detection): tensors saved
    with the result (``extras``: defense_result.pt, and PNGs for ``image_extras``) and
    plain values added to summary.json (``summary``). Filled through
    :meth:`DefenseData.add_extras` and :meth:`DefenseData.add_summary`."""

    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


class HandsOver:
    """What every kind's data object offers a method to hand results to the harness
    (:class:`Outputs`), instead of attributes left on the method for the harness to read.
    ``HandsOver()`` alone collects them for a data-free method called outside the harness."""

    outputs: Outputs

    def __init__(self) -> None:
        self.outputs = Outputs()

    def add_extras(self, **tensors: torch.Tensor) -> None:
        """Tensors saved with the result (a pruning mask, reversed triggers); a key of the
        method's ``image_extras`` holds N x C x H x W images in [0, 1], also written as PNGs."""
        self.outputs.extras.update(tensors)

    def add_summary(self, **values: Any) -> None:
        """Plain values (numbers, strings, lists, dicts of them) added to summary.json."""
        self.outputs.summary.update(values)


@dataclass
class DefenseData(HandsOver):
    """The defender's resources: a small clean subset of the training set (uint8, on the
    CPU), the dataset's declared info and train transform, the device, and a seed.

    Besides the data, the one way a method talks to the harness: :meth:`epochs` (its epoch
    loop: how many, resumable), :meth:`step` (an optimisation step: loss scaling under
    float16, the NaN check), :meth:`report` (an epoch's numbers), :meth:`add_extras` and
    :meth:`add_summary` (what the result keeps)."""

    clean: ImageData
    info: DatasetInfo
    device: torch.device
    amp: bool = False
    seed: int = 0
    monitor: Monitor | None = None
    checkpoint: Checkpoint | None = field(default=None, repr=False)
    _on_device: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # not fields: what the method hands over, checks it deferred, its gradient scaler (a
        # copy, dataclasses.replace, starts with its own)
        self.outputs = Outputs()
        self._pending: list[tuple[torch.Tensor, int, int, str]] = []
        self._scaler: torch.amp.GradScaler | None = None

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def __len__(self) -> int:
        return len(self.clean)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole clean subset as float [0, 1] images and labels on the device (cached):
        small subsets are cheaper held as one tensor than loaded batch by batch."""
        if self._on_device is None:
            self._on_device = (self.clean.images.to(self.device).float().div_(255.0), self.clean.labels.to(self.device))
        return self._on_device

    def batches(
        self, batch_size: int, *, shuffle: bool = True, augment: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of the clean subset on the device, with the train transform if ``augment``."""
        x_all, y_all = self.tensors()
        for x, y in batches(
            x_all, y_all, batch_size=batch_size, device=self.device, shuffle=shuffle, generator=generator
        ):
            yield (self.augment(x) if augment else x), y

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        return train_transform(self.info, x)

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded from the run's seed (for shuffling)."""
        return torch.Generator().manual_seed(self.seed + offset)

    def autocast(self):
        """Mixed precision for forward passes (``--amp`` on CUDA); a no-op otherwise."""
        return autocast(self.device, self.amp)

    @property
    def scaler(self) -> torch.amp.GradScaler:
        """The run's gradient scaler (active only under float16 autocast), used by
        :meth:`step` and saved with the checkpoint by :meth:`resume`."""
        if self._scaler is None:
            self._scaler = grad_scaler(self.device, self.amp)
        return self._scaler

    @property
    def sign_scale(self) -> float:
        """The factor to multiply a loss by before differentiating it when only the
        gradient's sign is used (1024 under float16 autocast, else 1: utils.runtime.sign_scale)."""
        return sign_scale(self.device, self.amp)

    def check(self, value: torch.Tensor, *, epoch: int, batch: int, what: str = "loss", defer: bool = False) -> None:
        """Stop the run with one line (naming ``what``, ``epoch`` and ``batch``) when
        ``value`` holds a NaN or an infinity. ``defer``: check at the next :meth:`report`
        (or when the method returns) instead, all deferred values with one host sync."""
        if defer:
            self._pending.append((first_non_finite(value), epoch, batch, what))
        else:
            check_finite(value, epoch, batch, what)

    def check_deferred(self) -> None:
        """Check the values :meth:`check` deferred (the harness calls it; so does :meth:`report`)."""
        pending, self._pending[:] = list(self._pending), []
        check_all_finite(pending)

    def step(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        *,
        epoch: int,
        batch: int,
        what: str = "loss",
        defer_check: bool = False,
        gradients: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """One optimisation step of ``optimizer`` on ``loss``, the same for every method:
        the NaN check (:meth:`check`), zeroed gradients, the backward pass through the
        gradient scaler (loss scaling under float16 autocast), the optimizer's step and the
        scaler's update. ``gradients``: (parameter, gradient) pairs the method computed
        itself (from ``data.scaler.scale(loss)``, e.g. a hypergradient) to step along
        instead of ``loss``'s backward pass. Returns ``loss`` detached (no host sync)."""
        self.check(loss, epoch=epoch, batch=batch, what=what, defer=defer_check)
        optimizer.zero_grad(set_to_none=True)
        if gradients is None:
            self.scaler.scale(loss).backward()
        else:
            for p, g in gradients:
                p.grad = g.detach()
        self.scaler.step(optimizer)
        self.scaler.update()
        return loss.detach()

    def epochs(self, count: int, **resumable: Any) -> range:
        """The epochs of the method's main loop, ``for epoch in data.epochs(self.epochs, ...)``:
        tells the harness how many there are (the last one is always evaluated; the progress
        bar) and, with ``resumable`` objects, makes the loop resumable (:meth:`resume`): the
        range then starts after a restored checkpoint's epoch."""
        if self.monitor is not None:
            self.monitor.last_epoch = count - 1
        start = self.resume(**resumable) if resumable else 0
        return range(start, count)

    def resume(self, **objects: Any) -> int:
        """Make the calling epoch loop resumable; returns the epoch to start from.

        ``objects`` are what changes from epoch to epoch (the model, its optimizer,
        scheduler and gradient scaler, shuffling generators; lists of them). From now on
        :meth:`report` also saves them, with the random states and the history rows,
        every ``--save_every`` epochs and after the last. With ``--resume`` and a
        checkpoint, their states are restored and the epoch after the saved one is
        returned; otherwise 0. One loop per run may call it. The gradient scaler of
        :meth:`step` is saved with them."""
        if self.checkpoint is None:
            return 0
        scaler = getattr(self, "scaler", None)  # step()'s; a TrainingSet (which borrows this) has none of its own
        self.checkpoint.track(**{**({"scaler": scaler} if scaler is not None else {}), **objects})
        restored = self.checkpoint.restore()
        if restored is None:
            return 0
        if self.monitor is not None:
            self.monitor.history.rows = [dict(row) for row in restored.get("history", [])]
        return int(restored["epoch"]) + 1

    def report(self, epoch: int, model: nn.Module, **values: float) -> None:
        """Record this epoch's numbers (losses, rates); the harness may evaluate the model
        and, after :meth:`resume`, save a checkpoint. The values :meth:`check` deferred
        are checked first."""
        self.check_deferred()
        if self.monitor is not None:
            self.monitor.report(epoch, model, **values)
        last = self.monitor.last_epoch if self.monitor is not None else None
        if self.checkpoint is not None and self.checkpoint.due(epoch, last):
            self.checkpoint.save(epoch, history=self.monitor.history.rows if self.monitor is not None else [])

    def split(self, fraction: float, seed_offset: int = 0) -> tuple["DefenseData", "DefenseData"]:
        """Split the clean subset in two (seeded): ``fraction`` of it goes to the second part."""
        order = torch.randperm(len(self.clean), generator=self.generator(seed_offset))
        cut = len(order) - max(1, int(round(fraction * len(order))))
        parts = []
        for idx in (order[:cut], order[cut:]):
            part = DefenseData(
                self.clean.subset(idx), self.info, self.device, self.amp, self.seed, self.monitor, self.checkpoint
            )
            part.outputs, part._pending, part._scaler = self.outputs, self._pending, self.scaler
            parts.append(part)
        return parts[0], parts[1]


# -- the validation split (tuning) ---------------------------------------------------------------------


@dataclass
class ValidationSplit:
    """What tuning reads instead of the test set: ``train``, the defender's clean subset
    minus a held-out part (what each trial trains on); ``clean``, that held-out part
    (validation C-Acc); ``backdoor``, poisoned *training* images of the record
    (``record.bd_train``, whose label the attack changed; never test images) for
    validation ASR. ``backdoor`` is empty when the record keeps no such images (attacks
    that poison each batch afresh, clean-label attacks)."""

    train: DefenseData
    clean: ImageData
    backdoor: PoisonedSet


def validation_split(
    defender: DefenseData,
    record: AttackRecord,
    fraction: float = 0.2,
    seed: int = 0,
    max_backdoor: int | None = 1000,
    held_indices: torch.Tensor | None = None,
) -> ValidationSplit:
    """Cut a validation split from what the defender holds: ``fraction`` of the clean
    subset (at least one sample, at least one left to train on), drawn with ``seed``, and
    up to ``max_backdoor`` of the record's poisoned training images whose label differs
    from their true one (drawn with ``seed``), leaving out those whose clean version the
    defender holds (``held_indices``: the clean subset's training indices). The train
    part keeps the defender's device, precision and seed, without a monitor or checkpoint."""
    n = len(defender.clean)
    if n < 2:
        raise UserError(
            f"the defender's clean subset has {n} sample(s): too few to hold out a validation part (raise --ratio)"
        )
    if not 0 < fraction < 1:
        raise UserError(f"the validation fraction must be in (0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    held = min(n - 1, max(1, int(round(fraction * n))))
    train = DefenseData(
        defender.clean.subset(order[held:].sort().values), defender.info, defender.device, defender.amp, defender.seed
    )
    clean = defender.clean.subset(order[:held].sort().values)
    poisoned = record.bd_train
    if poisoned is None:
        keep = torch.zeros(0, dtype=torch.long)
        c, h, w = defender.clean.images.shape[1:]
        poisoned = PoisonedSet(torch.zeros(0, c, h, w, dtype=torch.uint8), keep, keep, keep)
    usable = poisoned.labels != poisoned.original_labels
    if held_indices is not None:
        usable &= ~torch.isin(poisoned.indices, torch.as_tensor(held_indices, dtype=torch.long))
    keep = torch.nonzero(usable).flatten()
    if max_backdoor is not None and len(keep) > max_backdoor:
        keep = keep[torch.randperm(len(keep), generator=generator)[:max_backdoor]].sort().values
    backdoor = PoisonedSet(
        poisoned.images[keep], poisoned.labels[keep], poisoned.original_labels[keep], poisoned.indices[keep]
    )
    return ValidationSplit(train, clean, backdoor)


def evaluate_validation(model: nn.Module, split: ValidationSplit, device: torch.device, amp: bool = True) -> Metrics:
    """The harness's metrics on a validation split: C-Acc on its held-out clean part, ASR
    (and RA) on its poisoned training images (NaN when it has none)."""
    return evaluate(model, split.clean, split.backdoor, device=device, amp=amp)


# -- the contract ----------------------------------------------------------------------------------


class Defense(Method):
    """Base class. A defense takes its hyperparameters as annotated keyword arguments of
    ``__init__`` with the paper's defaults (kept as attributes of the same names),
    documents its paper in its docstring, and implements :meth:`mitigate`. It parses no
    argv, reads no record, evaluates nothing and prints nothing."""

    # mitigation: mitigate(model, DefenseData) -> model; data_detection: detect(model,
    # TrainingData) -> Detection; input_detection: fit(model, DefenseData) -> InputDetector;
    # training_time: train(defense.training.TrainingSet) -> model (defense.training.TrainingDefense).
    kind: ClassVar[Literal["mitigation", "data_detection", "input_detection", "training_time"]] = "mitigation"
    # Keys of data.add_extras(...) that hold N x C x H x W images in [0, 1]; the harness also writes
    # them as <key>/<i>.png (e.g. reversed triggers).
    image_extras: ClassVar[tuple[str, ...]] = ()
    # What ``python -m defense tune`` may search, next to the hyperparameters:
    # {param: ("float_log", lo, hi) | ("float", lo, hi) | ("int", lo, hi) | ("choice", [values])}.
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {}
    # (data_detection) whether detect() also reads the defender's clean subset (TrainingData.clean).
    uses_clean_subset: ClassVar[bool] = False

    def mitigate(self, model: Classifier, data: DefenseData) -> nn.Module:
        """Return the purified model (same architecture) from the backdoored ``model``."""
        raise NotImplementedError

    def detect(self, model: Classifier, data: "TrainingData") -> "Detection":
        """(data_detection) A suspicion score per training sample of ``data`` (higher =
        more suspicious), in order, and optionally the flagged set."""
        raise NotImplementedError

    def fit(self, model: Classifier, data: DefenseData) -> "InputDetector":
        """(input_detection) From the model and the defender's clean subset, a function
        that scores a batch of test inputs (float [0, 1] images on the device) with a
        :class:`Detection` (higher = more suspicious)."""
        raise NotImplementedError

    def train(self, data: Any) -> nn.Module:
        """(training_time) A model trained from the training set as delivered
        (defense.training.TrainingSet); see defense.training.TrainingDefense."""
        raise NotImplementedError


# The hooks a method once overrode to hand results over, read by the harness no more.
RETIRED_HOOKS = ("extras", "report")


class DefenseRegistry(Registry[Defense]):
    """The defenses' registry: refuses, with one line, a class that still defines a retired
    hook (:data:`RETIRED_HOOKS`), so that a method written against the old API fails loudly
    instead of silently losing what it hands over."""

    def register(self, name: str, *, aliases: Iterable[str] = ()):
        wrap = super().register(name, aliases=aliases)

        def checked(cls: type[Defense]) -> type[Defense]:
            hooks = [h for h in RETIRED_HOOKS if callable(getattr(cls, h, None))]
            if hooks:
                raise TypeError(
                    f"defense '{name}' ({cls.__module__}.{cls.__qualname__}) defines "
                    f"{' and '.join(f'{h}()' for h in hooks)}, which the harness no longer reads: hand "
                    "tensors over with data.add_extras(...) and summary values with data.add_summary(...) "
                    "inside mitigate/detect/fit/train"
                )
            return wrap(cls)

        return checked


DEFENSES: Registry[Defense] = DefenseRegistry("defense")
register_defense = DEFENSES.register


def list_defenses() -> list[str]:
    return DEFENSES.names()


def create_defense(name: str, **hyperparameters: Any) -> Defense:
    return DEFENSES.create(name, **hyperparameters)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with no parameter gradients (a reference model)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


# -- the harness ----------------------------------------------------------------------------------

COMMON: list[Param] = [
    Param(
        "result_file",
        str,
        help="attack record: its name (a folder of --record_root), or the path of its folder "
        "(absolute, or with a '/'; the folder's parent is then the record root)",
    ),
    Param("yaml_path", str | None, None, "defense config (default: config/defense/<name>/<dataset>.yaml)"),
    Param("ratio", float, 0.05, "defender's clean data, as a fraction of the training set", check=cfg.fraction),
    Param("index", str | None, None, "file of clean training indices, one a line (instead of --ratio)"),
    Param(
        "exclude_poisoned",
        bool,
        False,
        "draw the clean subset only among training samples that were not "
        "poisoned, and refuse an --index file naming poisoned ones (off: from all samples, as BackdoorBench; "
        "the images are the clean versions either way)",
    ),
    Param("device", str, "auto", "auto, cpu, cuda or cuda:N", control=True),
    Param("amp", bool, False, "mixed precision (bf16/fp16) on CUDA: opt-in; BackdoorBench runs fp32"),
    Param("random_seed", int, 0, "random seed", check=cfg.seed),
    Param("eval_every", int, 5, "evaluate every N epochs (and at the end)", check=cfg.positive, control=True),
    Param("record_root", str, "record", "folder of the records", control=True),
    Param(
        "data_root",
        str | None,
        None,
        "folder holding the datasets (default: ./data; never the record's own)",
        control=True,
    ),
    Param("download", bool, True, "download missing datasets where possible", control=True),
    Param("overwrite", bool, False, "replace an existing result", control=True),
    Param(
        "result_name",
        str | None,
        None,
        "folder of the result under <result_file>/defense/ (default: the "
        "defense's name; defense/compare.py uses <name>_seed<k> for seeds other than 0)",
        control=True,
    ),
    Param("resume", bool, False, "continue an interrupted run from its checkpoint", control="apart"),
    Param(
        "save_every",
        int,
        1,
        "save a checkpoint every N epochs (and after the last; 0: never)",
        check=cfg.non_negative,
        control="apart",
    ),
    Param(
        "retune",
        bool,
        False,
        "after a mitigation, also fine-tune a copy of the purified model on a small seeded "
        "mix of poisoned and clean training samples (the retuning attack, Min et al., NeurIPS 2024; "
        "utils/retune.py) and report its metrics as summary.json's 'retune' (on a finished result made "
        "without it, the same config otherwise: added to it, on its saved model, without running the defense again)",
        absent_is_default=True,
    ),
    Param(
        "trust_record",
        bool,
        False,
        "read a record that needs pickle (a foreign or old format): unpickling "
        "can run code, so only for records from a source you trust",
        control="apart",
    ),
    Param("debug", bool, False, "show tracebacks", control=True),
    Param(
        "retrain",
        bool | None,
        None,
        "data detection: retrain the model from scratch without the flagged samples "
        "(the attack's recipe, seeded) and report its C-Acc/ASR/RA (default: on for digits, off otherwise: it costs "
        "a training run); other kinds ignore it",
        absent_is_default=True,
    ),
]
# How or where a run is made, not what it computes (the ``control`` marks above): skipped when
# a finished result (compare's reuse) or a checkpoint (--resume) is checked against a request.
# --eval_every is one: it sets how many rows <name>_df.csv has, never the purified model or
# its final metrics (the harness's evaluation draws no random numbers).
CONTROL_KEYS = cfg.control_keys(COMMON)
# The controls handed over apart from the config, kept out of summary.json.
APART_KEYS = cfg.apart_keys(COMMON)
IGNORED_KEYS = frozenset(
    {
        "num_workers",
        "pin_memory",
        "non_blocking",
        "prefetch",
        "frequency_save",
        "dataset",
        "model",
        "dataset_path",
        "checkpoint_load",
        "checkpoint_save",
        "log",
    }
)


def resolve_config(name: str, argv: Sequence[str], overrides: dict[str, Any]) -> tuple[dict[str, Any], AttackRecord]:
    """The run's parameters (without the run controls --resume, --save_every and
    --trust_record) and its attack record."""
    values, _, record = _resolve(name, argv, overrides)
    return values, record


def show_config(name: str, dataset: str) -> str:
    """What ``python -m defense show NAME --dataset D`` prints: the YAML file a run of
    defense ``name`` on a record of ``dataset`` reads (and its recipe line), then every
    parameter's resolved value, those the file sets marked with the code's default."""
    cls = DEFENSES.get(name)
    params = [p for p in (*COMMON, *cls.params()) if not p.required and p.name != "yaml_path"]
    path = cfg.method_yaml("defense", cls.name, dataset)
    layers = [] if path is None else cfg.yaml_layers(path, IGNORED_KEYS)
    return cfg.resolved_text(f"defense {cls.name} on {dataset}", params, layers)


def _resolve(
    name: str, argv: Sequence[str], overrides: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], AttackRecord]:
    cls = DEFENSES.get(name)
    params = [*COMMON, *cls.params()]
    parser = cfg.build_parser(
        f"defense/{cls.name}.py",
        params,
        (cls.__doc__ or "").strip().split("\n")[0],
        "The defaults above are the code's; a run reads "
        f"config/defense/{cls.name}/<dataset>.yaml over them (<dataset>: the record's).\n"
        f"The values a run will use: python -m defense show {cls.name} --dataset <dataset>",
    )
    cli = cfg.parse_cli(parser, argv)
    cfg.check_early(params, overrides, ("result_file", "record_root", "yaml_path", "trust_record"))
    first = {**overrides, **cli}
    if "result_file" not in first:
        raise UserError("missing required argument --result_file (an attack record in record/)")
    # --result_file: a record's name in --record_root, or the path of a record folder (its
    # parent then becomes the record root, so that the result is written beside it)
    # the attack record's name inside: record_name (--result_file on the command line, as BackdoorBench)
    record_root, record_name = locate_record(Path(first.get("record_root", "record")), first["result_file"])
    if record_name != first["result_file"]:
        log.info("--result_file %s: record %s in the record root %s", first["result_file"], record_name, record_root)
    check_record_root(record_root)
    record = load_record(record_dir(record_root, record_name), trust=first.get("trust_record", False))
    layers = []
    yaml_path = first.get("yaml_path") or cfg.method_yaml("defense", cls.name, record.clean_data)
    if yaml_path is not None:
        layers.extend(cfg.yaml_layers(yaml_path, IGNORED_KEYS))  # a dataset's file over default.yaml
    layers.append(Layer("keyword arguments", overrides))
    cfg.refuse_user_only(layers)  # trust_record, record_root, data_root: never from a YAML file
    values = cfg.resolve(params, layers, cli)
    values["record_root"], values["result_file"] = str(record_root), record_name
    values["defense"] = cls.name
    values["yaml_path"] = None if yaml_path is None else cfg.shown(yaml_path)
    if cfg.given("data_root", layers, cli):
        check_data_root(values["data_root"])
    if values["data_root"] is None:  # the project's default: a record never chooses where data is read from
        values["data_root"] = "data"
    where = record.config.get("data_root")
    if isinstance(where, str) and where and os.path.abspath(where) != os.path.abspath(values["data_root"]):
        log.info(
            "the record's data_root %s is ignored (a record does not choose where datasets are read from); "
            "they are read from %s: pass --data_root DIR to read them elsewhere",
            cfg.brief(where, 400),
            values["data_root"],
        )
    control = {key: values.pop(key) for key in APART_KEYS}
    return values, control, record


def run(name: str, argv: Sequence[str] | None = None, **overrides: Any) -> dict[str, Any]:
    """Run defense ``name`` on an attack record from Python, ``run("sau", result_file="badnet_digits",
    epochs=5)``, and return the summary (also in summary.json). Never reads ``sys.argv``
    (utils.cli.python_call); ``argv``: a list of command-line arguments."""
    return python_call(lambda args, kw: _run(name, args, kw), argv, overrides)


def main(name: str) -> dict[str, Any]:
    """``python defense/<name>.py ARGS``: the script entry point, reading ``sys.argv``."""
    return entry(lambda args, kw: _run(name, args, kw), None, {})


def setup(
    name: str, argv: Sequence[str], overrides: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], AttackRecord, torch.device, Defense, Classifier]:
    """Everything that can be checked before the data is loaded, checked before anything
    is written: the config, the run controls, the record (and that its weights fit its
    model), the device and the defense."""
    values, control, record = _resolve(name, argv, overrides)
    cls = DEFENSES.get(name)
    if len(record.bd_test) == 0:
        raise UserError(
            f"{record.path}: the record's backdoor test set (bd_test) is empty: ASR and RA cannot be "
            "measured (a clean model's record has nothing to defend)"
        )
    device = resolve_device(values["device"])
    try:
        defense = cls(**{p.name: values[p.name] for p in cls.params()})
    except ValueError as exc:
        raise UserError(f"defense {cls.name}: {exc}") from None
    # the folder's name, so that a run that names it (as compare does) and one that leaves
    # it to the default are the same run (one checkpoint, one config)
    values["result_name"] = result_folder_name(cls.name, values["result_name"])
    model = record.build_model()
    check_finite_model(model, record)
    return values, control, record, device, defense, model


def check_finite_model(model: nn.Module, record: AttackRecord) -> None:
    """Refuse a record whose model is already non-finite: weights (or buffers) holding NaN
    or infinity, so that the run does not start and blame its learning rate later."""
    bad = [
        name
        for name, t in model.state_dict().items()
        if t.dtype.is_floating_point and not bool(torch.isfinite(t).all())
    ]
    if bad:
        where = record.path / "attack_result.pt" if record.path is not None else "the record"
        raise UserError(
            f"{where}: the record's weights hold NaN/inf ({len(bad)} tensor(s), e.g. "
            f"{cfg.clip(bad[0], 60)}): the model was broken before the defense started (the attack's "
            "training diverged?)"
        )


def _run(name: str, argv: Sequence[str], overrides: dict[str, Any]) -> dict[str, Any]:
    with held_logs() as loading:  # what reading the record says goes to the run's log
        values, control, record, device, defense, model = setup(name, argv, overrides)
        inputs = load_inputs(record, values)
        check_finite_outputs(model, inputs[0].train.images[inputs[1][:64]], record)
        check_detectable(defense, record)
    out = StagedFolder(
        record.path / "defense" / values["result_name"], values["overwrite"], root=Path(values["record_root"])
    )
    finished = finished_without_retune(out.final, values, record, defense)
    if finished is not None:
        return add_retune(finished, out.final, defense, record, values, device, inputs)
    if (
        out.final.is_dir()
        and not values["overwrite"]
        and not (out.final / "summary.json").exists()
        and any(out.final.glob("*_df*.csv"))
    ):
        raise UserError(
            f"{out.final} holds BackdoorBench's own {out.final.name} result: pass --result_name NAME "
            "to write ours beside it (or --overwrite to replace it)"
        )
    folder = out.open(resume=control["resume"])
    checkpoint = Checkpoint(
        out.checkpoint,
        control["save_every"],
        control["resume"],
        {**values, "record_sha256": record.sha256},
        CONTROL_KEYS,
        cfg.absent_defaults([*COMMON, *type(defense).params()]),
    )
    with guarded(out):
        with log_to(folder, f"{defense.name}.log"):
            log.info("defense %s on %s", defense.name, record.path)
            replay(loading)
            log.debug("config: %s", cfg.plain(values))
            defend = _defend if defense.kind in ("mitigation", "training_time") else _detect
            summary = defend(defense, record, values, device, folder, model, checkpoint, inputs)
        try:
            check_record_unchanged(record, trust=control["trust_record"])
        except UserError:
            discard_stale(out)
            raise
        final = out.commit()
    with log_to(None):  # the run's log is closed: the closing line goes to the console
        numbers = (
            closing_text(summary["after"], summary["before"], summary["der"])
            if "after" in summary
            else detection_text(summary["detection"])
        )
        log.info(
            "%s on %s done: %s  (%.1f s); result in %s",
            defense.name,
            values["result_file"],
            numbers,
            summary["seconds"],
            final,
        )
    return summary


def check_finite_outputs(model: nn.Module, images: torch.Tensor, record: AttackRecord) -> None:
    """Refuse a record whose model gives NaN or infinite outputs on clean images (a zero
    or non-finite std or mean in its normalization) before the defense starts, so that
    the run does not blame its learning rate later."""
    logits = predict(model, images, device=torch.device("cpu"), amp=False)
    if not bool(torch.isfinite(logits).all()):
        raise UserError(
            f"{record.path}: the record's model gives NaN/inf outputs on clean images before the defense "
            "started (its normalization: a std of 0, or a NaN/inf mean or std?)"
        )


def discard_stale(out: StagedFolder) -> None:
    """Remove a result staged for a record that was replaced meanwhile (checkpoint and
    all: it belongs to the old record), and the record's ``defense/`` folder when that
    leaves it empty."""
    if out.checkpoint.exists():
        out.checkpoint.unlink()
    out.discard()
    try:
        out.final.parent.rmdir()
    except OSError:
        pass  # not empty: other results


def result_folder_name(defense: str, result_name: str | None = None) -> str:
    """The folder of a result under ``<record>/defense/``: ``result_name``, or the
    defense's name (BackdoorBench's place). One plain folder name."""
    name = defense if result_name is None else result_name
    if not name or name.strip() != name or Path(name).name != name or name.startswith(".") or name in ("..", "."):
        raise UserError(f"--result_name {cfg.brief(name)} must be a plain folder name (no '/', not hidden)")
    return name


def clean_indices(
    train_labels: torch.Tensor,
    poison_indices: torch.Tensor,
    ratio: float,
    seed: int,
    index_file: str | None = None,
    exclude_poisoned: bool = False,
) -> torch.Tensor:
    """The defender's clean subset, sorted: the indices in ``index_file`` or
    ``int(ratio * N)`` indices drawn with ``seed`` from all N training samples.

    As BackdoorBench (utils/choose_index.py: ``random.sample(range(N), int(N * ratio))``
    on the clean training set, or ``np.loadtxt(index)``), a poisoned index may be drawn:
    the harness takes the images from the clean dataset, so the defender holds the clean
    version of that sample. ``index_file`` is BackdoorBench's format (``np.savetxt(...,
    fmt='%d')``: one index a line, no header), so its index.txt files are read as they
    are. With ``exclude_poisoned`` the draw skips the poisoned samples and a file naming
    one is refused (this project's earlier rule).

    Remaining deviations: the draw uses numpy's Generator seeded with ``seed``, not
    Python's global ``random`` state, so the same seed picks other samples; repeated
    indices in a file are kept once."""
    n = len(train_labels)
    if len(poison_indices) and (int(poison_indices.min()) < 0 or int(poison_indices.max()) >= n):
        raise UserError(
            f"the record's poison indices reach {int(poison_indices.max())}, but the training set has "
            f"{n} samples: the record was not made on these dataset files"
        )
    poisoned = torch.zeros(n, dtype=torch.bool)
    if exclude_poisoned:
        poisoned[poison_indices] = True
    if index_file is not None:
        try:
            with warnings.catch_warnings():  # an empty file: said below, in one line
                warnings.simplefilter("ignore", UserWarning)
                raw = np.loadtxt(index_file, dtype=np.int64, ndmin=1)
        except (OSError, ValueError) as exc:
            raise UserError(f"--index {index_file}: cannot read clean indices ({str(exc).splitlines()[0]})") from None
        idx = torch.from_numpy(raw)
        if len(idx) == 0:
            raise UserError(f"--index {index_file}: the file holds no index")
        if int(idx.min()) < 0 or int(idx.max()) >= n:
            raise UserError(f"--index {index_file}: indices must be in 0..{n - 1}")
        if poisoned[idx].any():
            bad = idx[poisoned[idx]][:5].tolist()
            raise UserError(
                f"--index {index_file}: indices {bad} are poisoned training samples (--exclude_poisoned refuses them)"
            )
        return idx.unique()
    pool = torch.nonzero(~poisoned).flatten()
    count = int(ratio * n)
    if count < 1:
        raise UserError(f"--ratio {ratio} gives an empty clean subset ({n} training samples)")
    count = min(count, len(pool))
    rng = np.random.default_rng(seed)
    return pool[torch.from_numpy(np.sort(rng.choice(len(pool), size=count, replace=False)))]


def load_inputs(record: AttackRecord, values: dict[str, Any]) -> tuple[Dataset, torch.Tensor]:
    """The record's dataset, checked against what the record says of it, and the
    defender's clean indices: loaded and checked before anything is written."""
    img_size = record.config.get("img_size")
    if img_size is not None and (not isinstance(img_size, int) or isinstance(img_size, bool) or img_size < 1):
        raise UserError(
            f"{record.path}: the record's config has img_size {cfg.brief(img_size)}, not a positive integer"
        )
    data = load_dataset(record.clean_data, values["data_root"], download=values["download"], img_size=img_size)
    if data.info.img_size != tuple(record.img_size) or data.info.num_classes != record.num_classes:
        raise UserError(
            f"{record.path}: the record says {record.clean_data} is {tuple(record.img_size)} with "
            f"{record.num_classes} classes, but the files in {data.root} are {data.info.img_size} with "
            f"{data.info.num_classes}"
        )
    check_clean_train(record, data.train.images, data.train.labels, str(data.root or record.clean_data))
    idx = clean_indices(
        data.train.labels,
        record.poison_indices,
        values["ratio"],
        values["random_seed"],
        values["index"],
        values["exclude_poisoned"],
    )
    return data, idx


def _same(a: Any, b: float) -> bool:
    """Equal numbers, NaN equal to NaN."""
    return a == b or (isinstance(a, float) and a != a and b != b)


def _defend(
    defense: Defense,
    record: AttackRecord,
    values: dict[str, Any],
    device: torch.device,
    folder: Path,
    model: Classifier | None = None,
    checkpoint: Checkpoint | None = None,
    inputs: tuple[Dataset, torch.Tensor] | None = None,
) -> dict[str, Any]:
    seed_everything(values["random_seed"])
    data, idx = load_inputs(record, values) if inputs is None else inputs
    model = (record.build_model() if model is None else model).to(device).eval()
    training_time = defense.kind == "training_time"
    if training_time:  # the defender holds the whole training set, as delivered (defense/training.py)
        idx = torch.arange(len(data.train))
    save_text("".join(f"{i}\n" for i in idx.tolist()), folder / "index.txt")
    log.info(
        "defender's %s: %d of %d training samples",
        "training set" if training_time else "clean subset",
        len(idx),
        len(data.train),
    )

    def measure(m: nn.Module) -> Metrics:  # float32, whatever --amp says
        return evaluate(m, data.test, record.bd_test, device=device)

    monitor = Monitor(measure, values["eval_every"])
    # Deprecated: a method that does not declare its loop with data.epochs(n) but keeps an
    # int attribute ``epochs`` has it read once it first reports (methods written before data.epochs).
    legacy = getattr(defense, "epochs", None)
    monitor.undeclared_last_epoch = legacy - 1 if isinstance(legacy, int) and not isinstance(legacy, bool) else None
    before = monitor.evaluate(model)
    log.info("before: C-Acc %.4f  ASR %.4f  RA %.4f", before.clean_acc, before.asr, before.ra)
    if training_time:  # what it hands over, from its TrainingSet (defense/training.py)
        defender: DefenseData | HandsOver = HandsOver()
    else:
        defender = DefenseData(
            data.train.subset(idx), data.info, device, values["amp"], values["random_seed"], monitor, checkpoint
        )

    seed_everything(values["random_seed"])
    start = time.perf_counter()
    if checkpoint is not None:
        checkpoint.start_clock()
    if training_time:
        from defense.training import train_time

        purified = train_time(defense, record, data, values, device, monitor, checkpoint, defender)
    else:
        purified = defense.mitigate(model, defender)
        defender.check_deferred()
    # a resumed run: the time of every part (stored in the checkpoint), not this part's only
    seconds = checkpoint.elapsed() if checkpoint is not None else time.perf_counter() - start
    if not isinstance(purified, Classifier) or purified.name != record.model_name:
        raise TypeError(
            f"{defense.name}.{'train' if training_time else 'mitigate'} must return a "
            f"model of the record's architecture (a {record.model_name})"
        )
    purified.eval()
    after = monitor.evaluate(purified)  # reused when the last report evaluated this model unchanged
    log.info("after:  C-Acc %.4f  ASR %.4f  RA %.4f  (%.1f s)", after.clean_acc, after.asr, after.ra, seconds)
    retuned = _retune(purified, record, data, values, device, measure) if values.get("retune") else None

    extras = defender.outputs.extras
    save_defense_result(folder, record.model_name, record.num_classes, purified.state_dict(), extras)
    for key in defense.image_extras:
        for i, image in enumerate(extras.get(key, ())):
            save_png(image, folder / key / f"{i}.png")
    final = after.as_row()
    last = monitor.history.rows[-1] if monitor.history.rows else {}
    if any(not _same(last.get(k), v) for k, v in final.items()):  # the returned model's row, without an epoch
        monitor.history.add(epoch=None, **final)
    columns = ("epoch", *METRIC_COLUMNS)
    monitor.history.save_csv(folder / f"{defense.name}_df.csv", columns)
    save_text(monitor.history.summary_csv(columns), folder / f"{defense.name}_df_summary.csv")
    monitor.history.save_plot(
        folder / f"{defense.name}_plot.png", f"{defense.name} on {record.path.name} ({record.model_name})"
    )
    summary = {
        "defense": defense.name,
        "result_file": values["result_file"],
        "before": before.headline(),
        "after": after.headline(),
        "der": der(before.asr, after.asr, before.clean_acc, after.clean_acc),
        "record_identity": record.identity,
        "seconds": round(seconds, 2),
        "eval_seconds": round(monitor.eval_seconds, 2),
        "device": str(device),
        "clean_samples": len(idx),
        **({"retune": retuned} if retuned else {}),
        **defender.outputs.summary,
        "config": cfg.plain({k: v for k, v in values.items() if k not in ("debug",)}),
        **provenance(),
    }
    save_json(summary, folder / "summary.json")
    return summary


def finished_without_retune(
    folder: Path, values: dict[str, Any], record: AttackRecord, defense: Defense
) -> dict[str, Any] | None:
    """The summary of a finished mitigation result in ``folder`` that is the run asked for
    except that it was made without --retune (same record, same config otherwise), when the
    request asks for --retune and no --overwrite: the retuning evaluation is then added to it
    (:func:`add_retune`) instead of running the defense again. None otherwise."""
    if not values.get("retune") or values["overwrite"] or defense.kind != "mitigation":
        return None
    summary = read_json(folder / "summary.json")
    if summary is None or "retune" in summary or not (folder / "defense_result.pt").is_file():
        return None
    if summary.get("record_identity") != record.identity:
        return None
    stored = summary.get("config")
    defaults = cfg.absent_defaults([*COMMON, *type(defense).params()])
    request = {**cfg.plain(values), "retune": False}
    if not isinstance(stored, dict) or cfg.config_diff(request, stored, CONTROL_KEYS, defaults=defaults):
        return None
    return summary


def add_retune(
    summary: dict[str, Any],
    folder: Path,
    defense: Defense,
    record: AttackRecord,
    values: dict[str, Any],
    device: torch.device,
    inputs: tuple[Dataset, torch.Tensor],
) -> dict[str, Any]:
    """--retune on a finished result made without it: the retuning attack on its saved
    purified model, added to its summary.json (``retune``, and ``config.retune`` true). The
    numbers are those a run made with --retune from the start gives (the same weights, the
    same seeded retuning); the defense is not run again."""
    data = inputs[0]
    purified = record.build_model()
    purified.load_state_dict(load_defense_result(folder / "defense_result.pt")["model"])
    purified.to(device).eval()
    with log_to(folder, f"{defense.name}.log"):
        log.info("--retune on the finished result in %s (the defense is not run again)", folder)
        retuned = _retune(
            purified, record, data, values, device, lambda m: evaluate(m, data.test, record.bd_test, device=device)
        )
    if retuned is None:
        return summary
    summary = {**summary, "retune": retuned, "config": {**summary["config"], "retune": True}}
    save_json(summary, folder / "summary.json")
    return summary


def _retune(
    purified: nn.Module,
    record: AttackRecord,
    data: Dataset,
    values: dict[str, Any],
    device: torch.device,
    measure: Callable[[nn.Module], Metrics],
) -> dict[str, Any] | None:
    """--retune: the metrics of a copy of ``purified`` after the retuning attack (utils/retune.py)."""
    from utils.retune import retune, retune_set

    samples = retune_set(data.train, record.bd_train, values["random_seed"])
    if samples is None:
        log.warning("--retune: the record keeps no poisoned training samples; no retuning")
        return None
    seed_everything(values["random_seed"])
    metrics = measure(retune(purified, samples, data.info, device, values["random_seed"], values["amp"]))
    log.info("after retuning: C-Acc %.4f  ASR %.4f  RA %.4f", metrics.clean_acc, metrics.asr, metrics.ra)
    return {**metrics.headline(), "poisoned_samples": samples.poisoned, "clean_samples": samples.clean}


# -- the detection kinds ----------------------------------------------------------------------------


def layer_module(model: Classifier, layer: str | None) -> nn.Module:
    """The module ``model.net.<layer>`` (None: the architecture's feature layer, its last
    stage); one UserError line when the architecture has no such module."""
    if layer is None:
        return model.feature_module()
    try:
        return model.net.get_submodule(layer)
    except AttributeError:
        raise UserError(
            f"model '{model.name}' has no layer '{layer}' (its stages: "
            f"{', '.join(model.spec.stages) or 'none declared'})"
        ) from None


@dataclass
class TrainingData(HandsOver):
    """What a data detector holds: the training set as the defender received it (uint8
    images and labels, the poisoned samples in place of their clean versions, on the
    CPU), the dataset's declared info, the device and a seed (a detector whose class sets
    ``uses_clean_subset`` gets :class:`TrainingDataWithClean`). No poison indicator, no
    poison indices, no test data: the fields below are all there is."""

    train: ImageData
    info: DatasetInfo
    device: torch.device
    amp: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self.outputs = Outputs()  # not a field: what the method hands over

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def labels(self) -> torch.Tensor:
        return self.train.labels

    def class_indices(self, min_size: int = 1) -> Iterator[tuple[int, np.ndarray]]:
        """(c, the indices of the training samples labelled c) for each class c with at least
        ``min_size`` samples."""
        labels = self.labels.numpy()
        for c in range(self.num_classes):
            idx = np.nonzero(labels == c)[0]
            if len(idx) >= min_size:
                yield c, idx

    def features(
        self, model: Classifier, images: torch.Tensor | None = None, batch_size: int = 256, layer: str | None = None
    ) -> torch.Tensor:
        """:meth:`penultimate` of ``images`` (uint8, N x C x H x W; default the training set)."""
        held = (
            self
            if images is None
            else TrainingData(
                ImageData(images, torch.zeros(len(images), dtype=torch.long)),
                self.info,
                self.device,
                self.amp,
                self.seed,
            )
        )
        return held.penultimate(model, batch_size, layer)

    def __len__(self) -> int:
        return len(self.train)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The training set in order, in batches of float [0, 1] images and labels on the device."""
        for start in range(0, len(self.train), batch_size):
            x = self.train.images[start : start + batch_size].to(self.device).float().div_(255.0)
            yield x, self.train.labels[start : start + batch_size].to(self.device)

    def penultimate(self, model: Classifier, batch_size: int = 256, layer: str | None = None) -> torch.Tensor:
        """The model's penultimate representation (the input of its classifier layer,
        :meth:`Classifier.penultimate`) of every training sample, in order: (N, D) float32
        on the CPU; with ``layer``, the flattened output of ``model.net.<layer>`` instead
        (BackdoorBench's ``target_layer``)."""
        if layer is not None:
            module = layer_module(model, layer)
            seen: list[torch.Tensor] = []
            hook = module.register_forward_hook(lambda m, i, out: seen.append(out.flatten(1).float().cpu()))
            try:
                with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                    for x, _ in self.batches(batch_size):
                        model.eval()(x)
            finally:
                hook.remove()
            return torch.cat(seen)
        was_training = model.training
        model.eval()
        out = []
        try:
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                for x, _ in self.batches(batch_size):
                    out.append(model.penultimate(x).float().cpu())
        finally:
            model.train(was_training)
        return torch.cat(out)

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded from the run's seed."""
        return torch.Generator().manual_seed(self.seed + offset)

    def autocast(self):
        return autocast(self.device, self.amp)


@dataclass
class TrainingDataWithClean(TrainingData):
    """What a data detector whose class sets ``uses_clean_subset`` (SCAn, Beatrix) holds:
    :class:`TrainingData` and the defender's clean subset (``clean``: uint8 images and
    labels, drawn as for a mitigation but only among training samples that were not
    poisoned, so that no clean twin of a poisoned image can be matched against the
    training set)."""

    clean: ImageData | None = None

    def clean_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean subset as float [0, 1] images and labels on the device."""
        return self.clean.images.to(self.device).float().div_(255.0), self.clean.labels.to(self.device)


@dataclass
class Detection:
    """A detector's verdict on N samples: ``scores`` (N floats, higher = more suspicious)
    and optionally ``flagged`` (N booleans: the method's own decision)."""

    scores: torch.Tensor
    flagged: torch.Tensor | None = None


InputDetector = Callable[[torch.Tensor], Detection]


def check_detectable(defense: Defense, record: AttackRecord) -> None:
    """A data detector needs poisoned training samples to find; a training-time defense, a
    training set the attacker delivered (defense.training.check_trainable)."""
    if defense.kind == "training_time":
        from defense.training import check_trainable

        check_trainable(defense.name, record)
    if defense.kind == "data_detection" and (record.bd_train is None or len(record.bd_train) == 0):
        raise UserError(
            f"{record.path}: the record keeps no poisoned training samples (bd_train; an attack that "
            f"poisons each batch afresh?): data detection ({defense.name}) has nothing to find"
        )


def checked_detection(defense: Defense, result: Any, n: int, where: str) -> Detection:
    """``result`` as a :class:`Detection` of ``n`` samples with finite float scores (on the CPU)."""
    if not isinstance(result, Detection):
        raise TypeError(f"{defense.name}.{where} must return a Detection, not {type(result).__name__}")
    scores = torch.as_tensor(result.scores).detach().float().cpu().flatten()
    if len(scores) != n:
        raise TypeError(f"{defense.name}.{where} returned {len(scores)} scores for {n} samples")
    if not bool(torch.isfinite(scores).all()):
        raise TypeError(f"{defense.name}.{where} returned NaN or infinite scores")
    flagged = None
    if result.flagged is not None:
        flagged = torch.as_tensor(result.flagged).detach().bool().cpu().flatten()
        if len(flagged) != n:
            raise TypeError(f"{defense.name}.{where} flagged {len(flagged)} values for {n} samples")
    return Detection(scores, flagged)


def score_inputs(defense: Defense, detector: InputDetector, images: torch.Tensor, device: torch.device) -> Detection:
    """``detector`` applied to uint8 ``images`` in batches of float [0, 1] images on ``device``."""
    from utils.metrics import eval_batch_size

    if not callable(detector):
        raise TypeError(
            f"{defense.name}.fit must return a function of a batch of images, not {type(detector).__name__}"
        )
    size = eval_batch_size(device)
    parts = []
    for start in range(0, len(images), size):
        x = images[start : start + size].to(device).float().div_(255.0)
        parts.append(checked_detection(defense, detector(x), len(x), "fit(...)(images)"))
    flags = [p.flagged for p in parts]
    return Detection(
        torch.cat([p.scores for p in parts]) if parts else torch.zeros(0),
        torch.cat(flags) if parts and all(f is not None for f in flags) else None,
    )


def _retrained(
    defense: Defense,
    record: AttackRecord,
    data: Dataset,
    flagged: torch.Tensor | None,
    values: dict[str, Any],
    device: torch.device,
) -> dict[str, Any] | None:
    """C-Acc, ASR and RA of the model retrained without the detector's flagged samples
    (defense/retrain.py); None when the detector flags nothing of its own."""
    from defense.retrain import retrain_without

    if flagged is None:
        log.warning("%s flags no samples of its own (scores only): nothing to retrain without", defense.name)
        return None
    start = time.perf_counter()
    model = retrain_without(record, data, flagged, device, seed=values["random_seed"], amp=values["amp"])
    metrics = evaluate(model, data.test, record.bd_test, device=device)
    seconds = time.perf_counter() - start
    log.info(
        "retrained without %d flagged samples: C-Acc %.4f  ASR %.4f  RA %.4f  (%.1f s)",
        int(flagged.sum()),
        metrics.clean_acc,
        metrics.asr,
        metrics.ra,
        seconds,
    )
    return {**metrics.headline(), "removed": int(flagged.sum()), "seconds": round(seconds, 2)}


def _detect(
    defense: Defense,
    record: AttackRecord,
    values: dict[str, Any],
    device: torch.device,
    folder: Path,
    model: Classifier | None = None,
    checkpoint: Checkpoint | None = None,
    inputs: tuple[Dataset, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The run of a detector (``kind`` data_detection or input_detection): it gets only
    what its kind may see; the harness scores, measures (utils.metrics.detection_metrics)
    and writes summary.json, <name>_scores.csv and BackdoorBench's detection_info.csv."""
    from utils.metrics import detection_info_csv, detection_metrics
    from utils.poison import poisoned_training_set

    del checkpoint  # a detection run is not resumable: it restarts
    seed_everything(values["random_seed"])
    data, idx = load_inputs(record, values) if inputs is None else inputs
    model = (record.build_model() if model is None else model).to(device).eval()
    check_detectable(defense, record)
    start = time.perf_counter()
    if defense.kind == "data_detection":
        train, truth = poisoned_training_set(data.train, record.bd_train)
        clean = None
        if defense.uses_clean_subset:
            idx = clean_indices(
                data.train.labels,
                record.poison_indices,
                values["ratio"],
                values["random_seed"],
                values["index"],
                exclude_poisoned=True,
            )
            save_text("".join(f"{i}\n" for i in idx.tolist()), folder / "index.txt")
            log.info(
                "defender's clean subset: %d of %d training samples (none of them poisoned)", len(idx), len(data.train)
            )
            clean = ImageData(data.train.images[idx], data.train.labels[idx])
        held = TrainingData(
            ImageData(train.images, train.labels), data.info, device, values["amp"], values["random_seed"]
        )
        if clean is not None:
            held = TrainingDataWithClean(held.train, held.info, device, held.amp, held.seed, clean)
        log.info("data detection on the training set as delivered: %d samples", len(held))
        seed_everything(values["random_seed"])
        result = checked_detection(defense, defense.detect(model, held), len(held), "detect")
        seconds = time.perf_counter() - start
        rows = [
            (
                "train",
                i,
                int(truth[i]),
                float(result.scores[i]),
                "" if result.flagged is None else int(result.flagged[i]),
            )
            for i in range(len(truth))
        ]
        extra = {"training_samples": len(held), **({} if clean is None else {"clean_samples": len(clean)})}
        retrain = values.get("retrain")
        if retrain or (retrain is None and record.clean_data == "digits"):
            extra["retrained"] = _retrained(defense, record, data, result.flagged, values, device)
    else:
        save_text("".join(f"{i}\n" for i in idx.tolist()), folder / "index.txt")
        log.info("defender's clean subset: %d of %d training samples", len(idx), len(data.train))
        held = DefenseData(data.train.subset(idx), data.info, device, values["amp"], values["random_seed"])
        seed_everything(values["random_seed"])
        detector = defense.fit(model, held)
        clean = score_inputs(defense, detector, data.test.images, device)
        bd = score_inputs(defense, detector, record.bd_test.images, device)
        seconds = time.perf_counter() - start
        truth = torch.cat(
            [torch.zeros(len(clean.scores), dtype=torch.bool), torch.ones(len(bd.scores), dtype=torch.bool)]
        )
        flagged = None if clean.flagged is None or bd.flagged is None else torch.cat([clean.flagged, bd.flagged])
        result = Detection(torch.cat([clean.scores, bd.scores]), flagged)
        rows = [
            (name, i, int(name == "bd_test"), float(part.scores[i]), "" if flagged is None else int(part.flagged[i]))
            for name, part in (("clean_test", clean), ("bd_test", bd))
            for i in range(len(part.scores))
        ]
        extra = {"clean_samples": len(idx)}
    metrics = detection_metrics(result.scores, truth, result.flagged)
    shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    log.info(
        "detection: %s  (%d poisoned of %d; %.1f s)",
        shown,
        metrics["positives"],
        metrics["positives"] + metrics["negatives"],
        seconds,
    )
    save_text(
        "set,index,poisoned,score,flagged\n" + "".join(f"{s},{i},{p},{v!r},{f}\n" for s, i, p, v, f in rows),
        folder / f"{defense.name}_scores.csv",
    )
    save_text(detection_info_csv(values["result_file"], metrics), folder / "detection_info.csv")  # BackdoorBench's
    summary = {
        "defense": defense.name,
        "kind": defense.kind,
        "result_file": values["result_file"],
        "detection": metrics,
        "record_identity": record.identity,
        "seconds": round(seconds, 2),
        "device": str(device),
        **extra,
        **held.outputs.summary,
        "config": cfg.plain({k: v for k, v in values.items() if k not in ("debug",)}),
        **provenance(),
    }
    save_json(summary, folder / "summary.json")
    return summary
