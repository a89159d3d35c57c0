"""FT-SAM: fine-tuning with Sharpness-Aware Minimization. Zhu, Wei, Shen, Fan and Wu,
"Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware Minimization",
ICCV 2023.

Idea: plain fine-tuning on clean data barely moves the weights that carry the backdoor,
because the backdoored model already sits in a flat region of the clean loss. FT-SAM
fine-tunes on the defender's clean subset with (adaptive) sharpness-aware minimization,

    min_w  max_{||T_w^{-1} epsilon||_2 <= rho}  L(w + epsilon),

which pushes the weights out of that region: the norms of backdoor-related neurons shrink
and the backdoor is forgotten. Each step (Kwon et al.'s ASAM, as BackdoorBench's SAM
optimizer with ``adaptive``): the gradient g of the loss at w; the ascent

    epsilon = rho * T_w^2 g / ||T_w g||_2,    T_w = diag(|w|)  (adaptive)
    epsilon = rho * g / ||g||_2                                   (plain SAM, T_w = I)

so that ||T_w^{-1} epsilon||_2 = rho; the gradient at w + epsilon (BatchNorm running
statistics frozen for this second pass); then the weights are restored to w and the base
optimizer (SGD) steps with that gradient.

Hyperparameters (BackdoorBench's config/defense/ft-sam/):
    epochs: fine-tuning epochs (100; gtsrb: 50)
    batch_size: batch size (256)
    lr: SGD learning rate at the start of the cosine schedule (0.01)
    momentum: SGD momentum (0.9)
    weight_decay: SGD weight decay (5e-4)
    lr_scheduler: per-epoch schedule, CosineAnnealingLR or none (CosineAnnealingLR)
    rho: radius of the weight perturbation (2.0; gtsrb and tiny: 8.0)
    adaptive: ASAM's weight-scaled perturbation (on, BackdoorBench's default: its
        ``--adaptive`` flag is store_false); off is plain SAM
    label_smoothing: BackdoorBench's smoothed cross-entropy, 1 - s on the label and
        s / (K - 1) on each other class (0.1; gtsrb and tiny: 0)
Every batch uses the dataset's train transform, as BackdoorBench's loader does.

Deviations from BackdoorBench:
* Its cosine schedule is stepped every batch with T_max = 100, so the rate cycles every 200
  batches; here it is stepped every epoch with T_max = ``epochs`` (as this project's FT).
  Its tiny config uses ReduceLROnPlateau, which is not offered: tiny gets the cosine one.
* rho is constant (BackdoorBench's rho_max = rho_min, so its rho scheduler is constant too),
  and its gradient decomposition (GSAM, ``alpha``) is left out: its configs set alpha 0,
  which makes it a no-op.
* The smoothed loss is computed as a cross-entropy against the smoothed targets, which
  differs from BackdoorBench's KL divergence by the targets' entropy, a constant: the
  gradients are the same.
* Mixed precision: forward passes run under autocast and float16 losses are scaled; a
  first-pass gradient that is not finite gives no perturbation (that step is plain SGD).

--resume: the loop checkpoints and resumes like FT's.

    python defense/ft_sam.py --result_file badnet_digits
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from defense.base import Defense, DefenseData, main, register_defense
from defense.finetune import sgd_loop
from utils import config as cfg


def smooth_cross_entropy(logits: torch.Tensor, y: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """Mean cross-entropy against targets 1 - smoothing on the label and smoothing / (K - 1)
    on every other class (BackdoorBench's smooth_crossentropy, up to a constant)."""
    logits = logits.float()
    target = torch.full_like(logits, smoothing / (logits.shape[1] - 1))
    target.scatter_(1, y.unsqueeze(1), 1.0 - smoothing)
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


@torch.no_grad()
def sam_perturbation(
    params: list[nn.Parameter], rho: float, adaptive: bool = True, eps: float = 1e-12
) -> list[torch.Tensor | None]:
    """The ascent epsilon for each parameter from its ``.grad`` (None where it has none):
    rho * T_w^2 g / ||T_w g|| with T_w = |w| (``adaptive``), or rho * g / ||g||; all zeros
    when the gradient norm is not finite."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return [None] * len(params)
    norm = torch.norm(torch.stack([((p.abs() if adaptive else 1.0) * p.grad).float().norm(2) for p in with_grad]), 2)
    finite = bool(torch.isfinite(norm))
    scale = rho / (norm + eps)
    out: list[torch.Tensor | None] = []
    for p in params:
        if p.grad is None:
            out.append(None)
            continue
        if not finite:
            out.append(torch.zeros_like(p.grad))
            continue
        e = p.grad * scale.to(p.grad)
        out.append(e * p.pow(2) if adaptive else e)
    return out


@contextmanager
def frozen_bn_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers keep their running statistics (momentum 0) inside the context."""
    saved = [(m, m.momentum) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m, _ in saved:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum


def sam_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    rho: float,
    adaptive: bool,
    data: DefenseData,
    scaler: torch.amp.GradScaler,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SAM step on batch ``x`` (``loss_fn`` maps logits to the loss): the gradient at w,
    the ascent to w + epsilon, the gradient there, w restored, then ``optimizer.step()``.
    Returns the logits and the loss at w."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    with data.autocast():
        logits = model(x)
    loss = loss_fn(logits)
    scaler.scale(loss).backward()
    epsilon = sam_perturbation(params, rho, adaptive)  # a scaled gradient gives the same direction
    with torch.no_grad():
        for p, e in zip(params, epsilon):
            if e is not None:
                p.add_(e)
    optimizer.zero_grad(set_to_none=True)
    with frozen_bn_statistics(model), data.autocast():
        perturbed_loss = loss_fn(model(x))
    scaler.scale(perturbed_loss).backward()
    with torch.no_grad():
        for p, e in zip(params, epsilon):
            if e is not None:
                p.sub_(e)
    scaler.step(optimizer)
    scaler.update()
    return logits.detach(), loss.detach()


@register_defense("ft_sam", aliases=("ft-sam",))
class FTSAM(Defense):
    """FT-SAM (Zhu et al., ICCV 2023): fine-tune on the clean subset with (adaptive) sharpness-aware minimization.

    Args:
        epochs: fine-tuning epochs
        batch_size: batch size
        lr: SGD learning rate at the start of the schedule
        momentum: SGD momentum
        weight_decay: SGD weight decay
        lr_scheduler: per-epoch learning-rate schedule
        rho: radius of the (weight-scaled, with adaptive) ascent perturbation
        adaptive: ASAM's perturbation scaled by |w| (off: plain SAM)
        label_smoothing: label smoothing of the cross-entropy (1 - s on the label, s / (K - 1) elsewhere)
    """

    paper = (
        "Zhu, Wei, Shen, Fan and Wu, Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware "
        "Minimization, ICCV 2023"
    )
    year = 2023
    kind = "mitigation"
    search_space = {"rho": ("float_log", 0.5, 10.0), "lr": ("float_log", 1e-3, 1e-1), "epochs": ("int", 10, 100)}
    param_aliases = {"momentum": ("sgd_momentum",), "weight_decay": ("wd",), "rho": ("rho_max",)}
    param_checks = {
        "epochs": cfg.non_negative,
        "batch_size": cfg.positive,
        "lr": cfg.positive,
        "momentum": cfg.non_negative,
        "weight_decay": cfg.non_negative,
        "rho": cfg.non_negative,
        "label_smoothing": lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
    }
    smoke_params = {"epochs": 2}

    def __init__(
        self,
        epochs: int = 100,
        batch_size: int = 256,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_scheduler: Literal["CosineAnnealingLR", "none"] = "CosineAnnealingLR",
        rho: float = 2.0,
        adaptive: bool = True,
        label_smoothing: float = 0.1,
    ):
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.momentum, self.weight_decay, self.lr_scheduler = momentum, weight_decay, lr_scheduler
        self.rho, self.adaptive, self.label_smoothing = rho, adaptive, label_smoothing

    def mitigate(self, model: nn.Module, data: DefenseData) -> nn.Module:
        loop = sgd_loop(
            model,
            data,
            epochs=self.epochs,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            lr_scheduler=self.lr_scheduler,
        )
        for epoch in loop.epochs:
            model.train()
            total, correct, seen = 0.0, 0, 0
            for x, y in data.batches(self.batch_size, augment=True, generator=loop.generator):
                logits, loss = sam_step(
                    model,
                    loop.optimizer,
                    lambda out, y=y: smooth_cross_entropy(out, y, self.label_smoothing),
                    x,
                    self.rho,
                    self.adaptive,
                    data,
                    loop.scaler,
                )
                data.check(loss, epoch=epoch, batch=seen // self.batch_size)
                total += loss.item() * len(y)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
            loop.end_epoch()
            data.report(epoch, model.eval(), train_loss=total / max(seen, 1), train_acc=correct / max(seen, 1))
        return model.eval()


if __name__ == "__main__":
    main("ft_sam")
