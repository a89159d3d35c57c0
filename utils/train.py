"""Training and inference loops over in-memory uint8 splits, on any device, with mixed
precision on CUDA. One place for the loops that attacks and defenses share."""
from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from utils.errors import UserError
from utils.runtime import autocast, tqdm_disable

BatchHook = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def batches(images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, device: torch.device,
            shuffle: bool = False, generator: torch.Generator | None = None,
            drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Float [0, 1] image batches and label batches on ``device``. ``images`` may be
    uint8 (converted per batch) or float; on CPU or already on the device."""
    n = len(images)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        x = images[idx.to(images.device)].to(device, non_blocking=True)
        y = labels[idx.to(labels.device)].to(device, non_blocking=True)
        yield (x.float().div_(255.0) if x.dtype == torch.uint8 else x), y


def check_finite(loss: torch.Tensor, epoch: int, step: int) -> None:
    if not torch.isfinite(loss).all():
        raise UserError(f"the loss became {loss.item()} at epoch {epoch}, batch {step}; "
                        "lower the learning rate or check the data")


Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]


def train_epoch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer], *, batch_size: int,
                device: torch.device, epoch: int = 0, augment: Callable | None = None,
                batch_hook: BatchHook | None = None, step: Step | None = None,
                scaler: torch.amp.GradScaler | None = None, amp: bool = True,
                generator: torch.Generator | None = None, desc: str = "train") -> dict[str, float]:
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
    for i, (x, y) in enumerate(tqdm(batches(images, labels, batch_size=batch_size, device=device, shuffle=True,
                                            generator=generator), total=steps, desc=desc, leave=False,
                                    disable=tqdm_disable())):
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
def predict(model: nn.Module, images: torch.Tensor, *, device: torch.device, batch_size: int = 512,
            amp: bool = True) -> torch.Tensor:
    """Logits (float32, on the CPU) for every image, in order; the model's mode is kept."""
    was_training = model.training
    model.eval()
    out = []
    dummy = torch.zeros(len(images), dtype=torch.long)
    for x, _ in batches(images, dummy, batch_size=batch_size, device=device):
        with autocast(device, amp):
            out.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def make_optimizer(params, name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
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
