"""Training and inference loops over in-memory uint8 splits, on any device, with mixed
precision on CUDA, and the checkpoints that make a loop resumable. One place for the
loops that attacks and defenses share."""

from __future__ import annotations

import collections
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from utils.config import config_diff, plain
from utils.errors import UserError
from utils.records import load_checkpoint, save_checkpoint
from utils.runtime import autocast, progress, rng_state, set_rng_state, tqdm_disable

log = logging.getLogger("saubench")

BatchHook = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Float [0, 1] image batches and label batches on ``device``. ``images`` may be
    uint8 (converted per batch) or float; on CPU or already on the device."""
    n = len(images)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        x = images[idx.to(images.device)].to(device, non_blocking=True)
        y = labels[idx.to(labels.device)].to(device, non_blocking=True)
        yield (x.float().div_(255.0) if x.dtype == torch.uint8 else x), y


def check_finite(value: torch.Tensor, epoch: int, step: int, what: str = "loss") -> None:
    """Stop the run with one line naming the epoch and batch when ``value`` (a loss, or
    any tensor a loop computed) holds a NaN or an infinity."""
    finite = torch.isfinite(value.detach())
    if not bool(finite.all()):
        bad = float(value.detach()[~finite].flatten()[0])
        raise UserError(
            f"the {what} became {bad} at epoch {epoch}, batch {step}; lower the learning rate or check the data"
        )


def first_non_finite(value: torch.Tensor) -> torch.Tensor:
    """The first NaN or infinity of ``value`` (a 0-d tensor; its first element when all
    are finite), found without a host sync."""
    flat = value.detach().flatten()
    return flat[(~torch.isfinite(flat)).to(torch.uint8).argmax()]


def check_all_finite(checked: Sequence[tuple[torch.Tensor, int, int, str]]) -> None:
    """Stop with :func:`check_finite`'s one line for the first of ``checked`` (value,
    epoch, batch, what) that is not finite: one host sync for the lot instead of one a
    value (the values are 0-d, e.g. :func:`first_non_finite`'s)."""
    if not checked or bool(torch.isfinite(torch.stack([v.float() for v, _, _, _ in checked])).all()):
        return
    for value, epoch, step, what in checked:
        check_finite(value, epoch, step, what)


Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]


def train_epoch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    *,
    batch_size: int,
    device: torch.device,
    epoch: int = 0,
    augment: Callable | None = None,
    batch_hook: BatchHook | None = None,
    step: Step | None = None,
    scaler: torch.amp.GradScaler | None = None,
    amp: bool = True,
    generator: torch.Generator | None = None,
    desc: str = "train",
) -> dict[str, float]:
    """One epoch over shuffled batches; returns the mean loss and accuracy.

    By default the loss is the cross-entropy of ``model``; ``augment`` is the dataset's
    train transform; ``batch_hook(x, y)`` may replace a batch after augmentation
    (training-controlled attacks poison batches on the fly). ``step(x, y)`` replaces the
    loss altogether (attacks that train a generator with the victim) and returns
    (loss, logits, targets), logits None when there is nothing to score. The loss is
    minimised with every optimizer in ``optimizers`` that received a gradient."""
    optimizers = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    steps = math.ceil(len(images) / batch_size)
    for i, (x, y) in enumerate(
        tqdm(
            batches(images, labels, batch_size=batch_size, device=device, shuffle=True, generator=generator),
            total=steps,
            desc=desc,
            leave=False,
            disable=tqdm_disable(),
        )
    ):
        if augment is not None:
            x = augment(x)
        if step is None and batch_hook is not None:
            x, y = batch_hook(x, y)
        with autocast(device, amp):
            if step is None:
                logits = model(x)
                loss, targets = F.cross_entropy(logits, y), y
            else:
                loss, logits, targets = step(x, y)
        check_finite(loss, epoch, i)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        for optimizer in optimizers:
            if any(p.grad is not None for group in optimizer.param_groups for p in group["params"]):
                if scaler is not None:
                    scaler.step(optimizer)
                else:
                    optimizer.step()
        if scaler is not None:
            scaler.update()
        total_loss += loss.item() * len(y)
        seen += len(y)
        if logits is not None:
            correct += int((logits.argmax(1) == targets).sum())
    return {"train_epoch_loss_avg_over_batch": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1)}


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, *, device: torch.device, batch_size: int = 512, amp: bool = True
) -> torch.Tensor:
    """Logits (float32, on the CPU) for every image, in order; the model's mode is kept."""
    was_training = model.training
    model.eval()
    out = []
    dummy = torch.zeros(len(images), dtype=torch.long)
    for x, _ in progress(
        batches(images, dummy, batch_size=batch_size, device=device),
        desc="evaluate",
        total=math.ceil(len(images) / batch_size),
        unit="batch",
    ):
        with autocast(device, amp):
            out.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def make_optimizer(
    params,
    name: str,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """BackdoorBench's optimizers: sgd (momentum, weight decay) or adam (amsgrad)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, amsgrad=True)
    raise UserError(f"unknown optimizer '{name}' (sgd or adam)")


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, epochs: int):
    """Per-epoch scheduler: CosineAnnealingLR over ``epochs`` or none."""
    if name == "CosineAnnealingLR":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    if name in ("none", "None", ""):
        return None
    raise UserError(f"unknown lr_scheduler '{name}' (CosineAnnealingLR or none)")


# -- checkpoints ---------------------------------------------------------------------------------------


class Checkpoint:
    """The resumable state of one training loop, written to ``path`` every ``every``
    epochs and after the last (``every`` 0: never), and restored with ``resume``.

    The loop registers what changes from epoch to epoch with :meth:`track`: models,
    optimizers, schedulers, gradient scalers and CPU or CUDA ``torch.Generator``s, or
    lists and dicts of them. :meth:`save` stores their states with the global random
    states (Python, NumPy, torch), the epoch and the loop's own plain values (its history
    rows); :meth:`restore` puts them back, so that a resumed run on the same device and
    seed ends with exactly the weights of an uninterrupted one. Only tensors and plain
    values are written (utils.records.save_checkpoint: atomically, Ctrl-C held back), so
    the file loads with ``torch.load(weights_only=True)``. ``config`` (the run's resolved
    values) is stored and must match on resume, except the keys in ``ignore`` (the run's
    controls, utils.config.control_keys: how the run is made, not what it computes); a
    checkpoint older than a parameter of ``defaults`` (utils.config.absent_defaults) holds its default."""

    def __init__(
        self,
        path: Path | None,
        every: int = 1,
        resume: bool = False,
        config: Mapping[str, Any] | None = None,
        ignore: Iterable[str] = (),
        defaults: Mapping[str, Any] | None = None,
    ):
        self.path = None if path is None else Path(path)
        self.every = int(every)
        self.resume = resume
        self.ignore = frozenset(ignore)
        self.defaults = dict(defaults or {})  # utils.config.absent_defaults: what an older checkpoint lacks
        self.config = plain({k: v for k, v in (config or {}).items() if k not in self.ignore})
        self.objects: dict[str, Any] | None = None
        self.saved: int | None = None  # the epoch of the last checkpoint written or restored
        self.earlier_seconds = 0.0  # the run's time before the checkpoint it resumed from
        self._clock: float | None = None

    def start_clock(self) -> None:
        """Start timing the run (the harness calls it where its ``seconds`` start)."""
        self._clock = time.perf_counter()

    def elapsed(self) -> float:
        """The run's seconds so far, every part of it: the time stored in the checkpoint it
        resumed from plus this part's since :meth:`start_clock`."""
        return self.earlier_seconds + (0.0 if self._clock is None else time.perf_counter() - self._clock)

    def track(self, **objects: Any) -> None:
        """Register the loop's state (None values are skipped). One loop per run."""
        if self.objects is not None:
            raise RuntimeError("a run checkpoints one training loop; track() was called twice")
        self.objects = {name: obj for name, obj in objects.items() if obj is not None}

    def due(self, epoch: int, last_epoch: int | None = None) -> bool:
        """Is a checkpoint due after ``epoch`` (every ``every`` epochs, and after the last)?"""
        if self.path is None or self.every <= 0 or self.objects is None:
            return False
        return (epoch + 1) % self.every == 0 or epoch == last_epoch

    def save(self, epoch: int, **extra: Any) -> None:
        """Write the tracked state after ``epoch`` with ``extra`` (plain values)."""
        if self.path is None or self.objects is None:
            return
        save_checkpoint(
            {
                "epoch": int(epoch),
                "config": self.config,
                "rng": rng_state(),
                "seconds": self.elapsed(),
                "objects": {name: _state_of(obj) for name, obj in self.objects.items()},
                "extra": extra,
            },
            self.path,
        )
        self.saved = int(epoch)
        log.debug("checkpoint after epoch %d written to %s", epoch, self.path)

    def restore(self) -> dict[str, Any] | None:
        """With ``resume`` and a checkpoint at ``path``: restore the tracked objects and
        the random states, and return ``{"epoch": e, **extra}`` (the loop goes on at
        ``e + 1``); otherwise None (the loop starts from the beginning)."""
        if not self.resume or self.path is None or self.objects is None:
            return None
        if not self.path.is_file():
            log.info("--resume: no checkpoint in %s; starting from the beginning", self.path.parent)
            return None
        data = load_checkpoint(self.path)
        try:
            stored, objects, epoch = data["config"], data["objects"], int(data["epoch"])
            differences = config_diff(
                self.config, stored, self.ignore, labels=("checkpoint", "now"), defaults=self.defaults
            )
            if differences:
                raise UserError(
                    f"cannot resume from {self.path}: it was made with other settings ("
                    + "; ".join(differences[:4])
                    + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
                    + "); run without --resume to start again"
                )
            if set(objects) != set(self.objects):
                raise UserError(
                    f"cannot resume from {self.path}: it holds the state of {sorted(objects)}, "
                    f"this run trains {sorted(self.objects)}"
                )
            for name, obj in self.objects.items():
                _load_state(obj, objects[name], name)
            set_rng_state(data["rng"])
            seconds = data.get("seconds", 0.0)  # absent in checkpoints of older versions
            if (
                isinstance(seconds, (int, float))
                and not isinstance(seconds, bool)
                and math.isfinite(seconds)
                and seconds >= 0
            ):
                self.earlier_seconds = float(seconds)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise UserError(
                f"cannot resume from {self.path}: it does not fit this run "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})"
            ) from None
        self.saved = epoch
        log.info("resuming after epoch %d from %s", epoch, self.path)
        return {**dict(data.get("extra") or {}), "epoch": epoch}


def _state_of(obj: Any) -> Any:
    """A tensors-and-plain-values state of ``obj`` (see Checkpoint.track)."""
    if isinstance(obj, torch.Generator):
        return {"generator": obj.get_state()}
    if isinstance(obj, (list, tuple)):
        return [_state_of(o) for o in obj]
    if isinstance(obj, dict):
        return {str(k): _state_of(v) for k, v in obj.items()}
    if hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"):
        return {"state_dict": _plain_state(obj.state_dict())}
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def _load_state(obj: Any, state: Any, name: str) -> None:
    if isinstance(obj, torch.Generator):
        obj.set_state(state["generator"])
    elif isinstance(obj, (list, tuple)):
        if not isinstance(state, list) or len(state) != len(obj):
            raise ValueError(
                f"'{name}' holds {len(state) if isinstance(state, list) else '?'} states for {len(obj)} objects"
            )
        for i, (o, st) in enumerate(zip(obj, state)):
            _load_state(o, st, f"{name}[{i}]")
    elif isinstance(obj, dict):
        if not isinstance(state, dict) or set(state) != {str(k) for k in obj}:
            raise ValueError(f"'{name}' holds other entries than this run's")
        for k, o in obj.items():
            _load_state(o, state[str(k)], f"{name}.{k}")
    else:
        sd = _unplain_state(state["state_dict"])
        if isinstance(obj, torch.amp.GradScaler) and not sd:
            return  # saved by a disabled scaler (a CPU run): nothing to restore
        obj.load_state_dict(sd)


def _plain_state(value: Any) -> Any:
    """``value`` with the collections.Counter of some schedulers (MultiStepLR's milestones)
    turned into a tagged list, so that the file needs no pickle on any torch version."""
    if isinstance(value, collections.Counter):
        return {"__counter__": [[k, v] for k, v in value.items()]}
    if isinstance(value, dict):
        return {k: _plain_state(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_state(v) for v in value]
    return value


def _unplain_state(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__counter__"}:
            return collections.Counter({k: v for k, v in value["__counter__"]})
        return {k: _unplain_state(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unplain_state(v) for v in value]
    return value
