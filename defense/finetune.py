"""Fine-tuning on the defender's data: the loop shared by FT, FP (after pruning), NAD (its
teacher) and NC (unlearning). Not a defense itself: it registers nothing. A reported
fine-tuning is the run's resumable loop (``data.resume``); NAD's teacher, not reported,
is trained again on resume."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from defense.base import DefenseData
from utils.runtime import grad_scaler
from utils.train import make_optimizer, make_scheduler, train_epoch


@dataclass
class SGDLoop:
    """What an SGD epoch loop holds: its optimizer, per-epoch scheduler (or None), gradient
    scaler, shuffling generator, and its epochs (after a restored checkpoint's, when the
    loop is the run's resumable one)."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    epochs: range

    def step(self, loss: torch.Tensor) -> None:
        """One optimizer step on ``loss`` (scaled under mixed precision)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def end_epoch(self) -> None:
        """Advance the per-epoch schedule, if any."""
        if self.scheduler is not None:
            self.scheduler.step()


def descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """zero_grad, backward, step: one unscaled step of ``optimizer`` on ``loss``."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def sgd_loop(
    model: nn.Module,
    data: DefenseData,
    *,
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    lr_scheduler: str,
    params: Iterable[torch.Tensor] | None = None,
    resume: bool = True,
    seed_offset: int = 0,
) -> SGDLoop:
    """SGD over ``params`` (default: the model's) with a per-epoch schedule, a gradient
    scaler and a seeded generator; with ``resume``, the loop is the run's own: declared
    and made resumable (``data.epochs``), its ``epochs`` starting after a restored
    checkpoint's."""
    optimizer = make_optimizer(model.parameters() if params is None else params, "sgd", lr, momentum, weight_decay)
    scheduler = make_scheduler(optimizer, lr_scheduler, epochs)
    generator = data.generator(seed_offset)
    if resume:  # the run's loop: declared to the harness (data.epochs), resumable
        scaler = data.scaler
        span = data.epochs(epochs, model=model, optimizer=optimizer, scheduler=scheduler, generator=generator)
    else:
        scaler, span = grad_scaler(data.device, data.amp), range(epochs)
    return SGDLoop(optimizer, scheduler, scaler, generator, span)


def fine_tune(
    model: nn.Module,
    data: DefenseData,
    *,
    epochs: int,
    lr: float = 0.01,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    augment: bool = True,
    lr_scheduler: str = "CosineAnnealingLR",
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    report: bool = True,
    epoch_offset: int = 0,
    seed_offset: int = 0,
) -> nn.Module:
    """SGD with momentum and weight decay, a per-epoch schedule, and the dataset's train
    transform, on ``images``/``labels`` (default: the defender's clean subset). With
    ``report``, each epoch's loss and accuracy go to ``data.report`` as epoch
    ``epoch_offset + e``, and the loop checkpoints and resumes (``data.resume``).
    Returns ``model`` in eval mode."""
    if images is None:
        images, labels = data.tensors()
    loop = sgd_loop(
        model,
        data,
        epochs=epochs,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        lr_scheduler=lr_scheduler,
        resume=report,
        seed_offset=seed_offset,
    )
    for epoch in loop.epochs:
        stats = train_epoch(
            model,
            images,
            labels,
            loop.optimizer,
            batch_size=batch_size,
            device=data.device,
            epoch=epoch,
            augment=data.augment if augment else None,
            scaler=loop.scaler,
            amp=data.amp,
            generator=loop.generator,
            desc=f"fine-tune {epoch}",
        )
        loop.end_epoch()
        if report:
            data.report(
                epoch_offset + epoch,
                model,
                train_loss=stats["train_epoch_loss_avg_over_batch"],
                train_acc=stats["train_acc"],
            )
    return model.eval()
