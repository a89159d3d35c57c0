"""DBD: backdoor defense via decoupling the training process. Huang, Li, Wu, Qin and Ren,
"Backdoor Defense via Decoupling the Training Process", ICLR 2022 (arXiv:2202.03423);
BackdoorBench's version (defense/dbd.py, config/defense/dbd/, utils/defense_utils/dbd/).

Idea: end-to-end supervised training is what lets the trigger's features cluster with the
target class. DBD decouples it: (1) the backbone learns from the images alone by
self-supervised learning (SimCLR, defense/simclr.py), where poisoned samples scatter with
their true classes; (2) a linear head is trained on the frozen backbone with the symmetric
cross-entropy (SCE, robust to noisy labels), so that poisoned samples, whose features sit
with their true class, keep a high loss; (3) the ``epsilon`` share of samples with the lowest
SCE loss is kept with its labels (high credibility) and the rest loses its labels, and the
whole model is fine-tuned by MixMatch semi-supervised learning on that split, re-drawn every
epoch from the current model's losses.

Hyperparameters (BackdoorBench's config/defense/dbd/cifar10.yaml and the DBD configs its
code reads, config_z/pretrain/squareTrigger/cifar10 and config_z/semi/badnets/cifar10):
    epoch_self (100), batch_size_self (512), lr_self (0.4), self_t_max (1000), temperature (0.5):
        SimCLR (SGD, momentum 0.9, weight decay 1e-4, cosine schedule stepped each epoch)
    simclr_augment (batched): the SimCLR views drawn for the whole batch at once with per-image
        parameters (per_image: torchvision v2 image by image); defense/simclr.py
    epoch_warmup (10), warmup_batch_size (128), sce_alpha (0.1), sce_beta (1.0): the linear head's epochs
    epsilon (0.5): the share of lowest-SCE samples kept labelled
    semi_epochs (100; BackdoorBench's ``epochs``), train_iteration (1024), semi_batch_size (64),
        mixmatch_temperature (0.5), mixmatch_alpha (0.75), lambda_u (15), rampup_length (190): MixMatch
    semi_lr (0.002): Adam over the linear head, then the whole model (no schedule)
The architecture is the record's (the attack's recipe).

Deviations from BackdoorBench:
* The backbone is a fresh model of the record's architecture (its penultimate layer), and
  the linear head is that model's own classifier layer, so the result is a model of the
  record's architecture (BackdoorBench builds separate DBD networks).
* MixMatch runs one forward pass over the mixed labelled and unlabelled batch instead of
  BackdoorBench's interleaved passes (which exist to give batch norm mixed statistics; one
  pass over all gives it the same mix).
* The SimCLR augmentation's deviations: defense/simclr.py.
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import logging
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defense.base import main, register_defense
from defense.simclr import SIMCLR_ARGS, SIMCLR_CHECKS, SimCLRStage
from defense.training import Phases, Recipe, TrainingDefense, TrainingSet
from utils import config as cfg
from utils.models import Classifier
from utils.train import predict

log = logging.getLogger("saubench")


def _ratio(value: float) -> str | None:
    return None if 0.0 < value < 1.0 else "must be in (0, 1)"


def symmetric_cross_entropy(
    logits: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    alpha: float = 0.1,
    beta: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """SCE (Wang et al., ICCV 2019) as BackdoorBench computes it: ``alpha * CE + beta * RCE``,
    the reverse cross-entropy ``-sum_k p_k log q_k`` with ``p`` the softmax clamped to
    [1e-7, 1] and ``q`` the one-hot label clamped to [1e-4, 1]."""
    ce = F.cross_entropy(logits, y, reduction="none")
    p = F.softmax(logits, dim=1).clamp(min=1e-7, max=1.0)
    q = F.one_hot(y, num_classes).float().clamp(min=1e-4, max=1.0)
    loss = alpha * ce - beta * (p * q.log()).sum(1)
    return loss.mean() if reduction == "mean" else loss


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """MixMatch's sharpening: ``p^(1/T)`` renormalised over classes."""
    pt = p ** (1.0 / temperature)
    return pt / pt.sum(1, keepdim=True)


def mixup(x: torch.Tensor, targets: torch.Tensor, lam: float, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MixMatch's mixup with ``lam`` (already ``max(l, 1 - l)``) and partner permutation ``perm``."""
    return lam * x + (1 - lam) * x[perm], lam * targets + (1 - lam) * targets[perm]


def rampup(epoch: float, length: int) -> float:
    """The linear ramp of the unlabelled loss's weight: ``clip(epoch / length, 0, 1)`` (1 if length is 0)."""
    return 1.0 if length == 0 else float(np.clip(epoch / length, 0.0, 1.0))


def mixmatch_loss(
    xlogits: torch.Tensor, xtargets: torch.Tensor, ulogits: torch.Tensor, utargets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixMatch's losses: Lx, the soft cross-entropy of the labelled part, and Lu, the mean
    squared error between the unlabelled part's softmax and its targets (mean over classes too)."""
    lx = -(F.log_softmax(xlogits, 1) * xtargets).sum(1).mean()
    lu = ((F.softmax(ulogits, 1) - utargets) ** 2).mean()
    return lx, lu


def credible(losses: torch.Tensor, epsilon: float) -> torch.Tensor:
    """BackdoorBench's high-credibility split: a boolean mask of the ``int(N * epsilon)``
    lowest losses (labelled); the rest is unlabelled."""
    mask = torch.zeros(len(losses), dtype=torch.bool)
    mask[torch.argsort(losses, stable=True)[: int(len(losses) * epsilon)]] = True
    return mask


class Cycler:
    """Batches of indices drawn as from a shuffled loader with drop_last, restarting with a
    fresh permutation when one runs out (BackdoorBench's re-created iterators)."""

    def __init__(self, indices: torch.Tensor, batch_size: int, generator: torch.Generator):
        batch_size = min(batch_size, len(indices))
        self.indices, self.batch_size, self.generator = indices, batch_size, generator
        self.order, self.at = torch.zeros(0, dtype=torch.long), 0

    def next(self) -> torch.Tensor:
        if self.at + self.batch_size > len(self.order):
            self.order, self.at = self.indices[torch.randperm(len(self.indices), generator=self.generator)], 0
        out = self.order[self.at : self.at + self.batch_size]
        self.at += self.batch_size
        return out


@register_defense("dbd")
class DBD(TrainingDefense):
    __doc__ = (
        "DBD: SimCLR backbone, SCE linear head on it frozen, MixMatch on the lowest-loss (credible) split.\n\n"
        "    Args:\n"
        + SIMCLR_ARGS
        + """epoch_warmup: epochs of the linear head on the frozen backbone
        warmup_batch_size: their batch size
        sce_alpha: SCE's cross-entropy weight
        sce_beta: SCE's reverse cross-entropy weight
        epsilon: share of the lowest SCE losses kept labelled
        semi_epochs: MixMatch epochs
        train_iteration: MixMatch steps an epoch
        semi_batch_size: MixMatch batch size (labelled and unlabelled each)
        mixmatch_temperature: MixMatch's sharpening temperature
        mixmatch_alpha: MixMatch's Beta(alpha, alpha) mixup
        lambda_u: the unlabelled loss's weight after the ramp
        rampup_length: epochs of the ramp
        semi_lr: Adam learning rate of the head and of MixMatch
"""
    )

    paper = (
        "Huang, Li, Wu, Qin and Ren, Backdoor Defense via Decoupling the Training Process, ICLR 2022, arXiv:2202.03423"
    )
    year = 2022
    param_checks = {
        **SIMCLR_CHECKS,
        "epoch_warmup": cfg.non_negative,
        "warmup_batch_size": cfg.positive,
        "epsilon": _ratio,
        "semi_epochs": cfg.non_negative,
        "train_iteration": cfg.positive,
        "semi_batch_size": cfg.positive,
        "mixmatch_temperature": cfg.positive,
        "mixmatch_alpha": cfg.positive,
        "lambda_u": cfg.non_negative,
        "rampup_length": cfg.non_negative,
        "semi_lr": cfg.positive,
    }
    smoke_params = {"epoch_self": 1, "epoch_warmup": 1, "semi_epochs": 1, "train_iteration": 2}

    def __init__(
        self,
        epoch_self: int = 100,
        batch_size_self: int = 512,
        lr_self: float = 0.4,
        self_t_max: int = 1000,
        temperature: float = 0.5,
        epoch_warmup: int = 10,
        warmup_batch_size: int = 128,
        sce_alpha: float = 0.1,
        sce_beta: float = 1.0,
        epsilon: float = 0.5,
        semi_epochs: int = 100,
        train_iteration: int = 1024,
        semi_batch_size: int = 64,
        mixmatch_temperature: float = 0.5,
        mixmatch_alpha: float = 0.75,
        lambda_u: float = 15.0,
        rampup_length: int = 190,
        semi_lr: float = 0.002,
        simclr_augment: Literal["batched", "per_image"] = "batched",
    ):
        self.epoch_self, self.batch_size_self, self.lr_self = epoch_self, batch_size_self, lr_self
        self.self_t_max, self.temperature, self.simclr_augment = self_t_max, temperature, simclr_augment
        self.epoch_warmup, self.warmup_batch_size, self.sce_alpha, self.sce_beta = (
            epoch_warmup,
            warmup_batch_size,
            sce_alpha,
            sce_beta,
        )
        self.epsilon, self.semi_epochs, self.train_iteration = epsilon, semi_epochs, train_iteration
        self.semi_batch_size, self.mixmatch_temperature = semi_batch_size, mixmatch_temperature
        self.mixmatch_alpha, self.lambda_u, self.rampup_length, self.semi_lr = (
            mixmatch_alpha,
            lambda_u,
            rampup_length,
            semi_lr,
        )

    def phases(self) -> Phases:
        return Phases(("self", self.epoch_self), ("warmup", self.epoch_warmup), ("semi", self.semi_epochs))

    def total_epochs(self, recipe: Recipe) -> int:
        return self.phases().total

    def sce(self, logits: torch.Tensor, y: torch.Tensor, num_classes: int, reduction: str = "mean") -> torch.Tensor:
        return symmetric_cross_entropy(logits, y, num_classes, self.sce_alpha, self.sce_beta, reduction)

    def train(self, data: TrainingSet) -> nn.Module:
        model, simclr = data.new_model(), SimCLRStage(self)
        self_model, self_optimizer, self_scheduler, augmentation = simclr.build(model, data)
        optimizer = torch.optim.Adam(model.parameters(), lr=self.semi_lr)
        generator = data.generator()
        start = data.resume(
            model=model,
            self_model=self_model,
            optimizers=[self_optimizer, optimizer],
            schedulers=[self_scheduler],
            generator=generator,
        )
        phases, labelled = self.phases(), None
        for epoch in range(start, phases.total):
            phase, e = phases.of(epoch)
            if phase == "self":
                loss = simclr.epoch(self_model, data, self_optimizer, self_scheduler, augmentation, epoch, generator)
                data.report(epoch, model, simclr_loss=loss)
            elif phase == "warmup":
                stats = self.warmup_epoch(data, model, optimizer, epoch, generator)
                data.report(epoch, model, sce_loss=stats["train_epoch_loss_avg_over_batch"])
            else:
                labelled = self.split(data, model)
                # BackdoorBench's ramp counts the epochs from the first linear warm-up epoch
                lx, lu = self.semi_epoch(data, model, optimizer, labelled, self.epoch_warmup + e, generator)
                data.report(epoch, model, lx=lx, lu=lu)
        # the training indices the last semi-supervised epoch took as labelled (none when it never ran)
        kept = torch.zeros(0, dtype=torch.long) if labelled is None else torch.nonzero(labelled).flatten()
        data.add_extras(labelled=kept)
        data.add_summary(labelled=len(kept))
        return model.eval()

    def warmup_epoch(
        self,
        data: TrainingSet,
        model: Classifier,
        optimizer: torch.optim.Optimizer,
        epoch: int,
        generator: torch.Generator,
    ) -> dict[str, float]:
        """One epoch of the linear head on the frozen backbone (train transform, SCE)."""
        head = model.classifier_layer()

        def step(x, y):
            with torch.no_grad():
                features = model.penultimate(x)
            logits = head(features)
            return self.sce(logits, y, data.num_classes), logits, y

        return data.train_epoch(
            model,
            optimizer,
            epoch=epoch,
            step=step,
            generator=generator,
            batch_size=self.warmup_batch_size,
            desc=f"linear warm-up {epoch}",
        )

    def split(self, data: TrainingSet, model: Classifier) -> torch.Tensor:
        """The high-credibility mask: the ``epsilon`` share with the lowest SCE loss under the
        current model (eval mode, no transform)."""
        logits = predict(model, data.train.images, device=data.device, amp=data.amp)
        mask = credible(self.sce(logits, data.train.labels, data.num_classes, reduction="none"), self.epsilon)
        log.info("DBD: %d of %d samples kept labelled (lowest SCE loss)", int(mask.sum()), len(mask))
        return mask

    def semi_epoch(
        self,
        data: TrainingSet,
        model: Classifier,
        optimizer: torch.optim.Optimizer,
        labelled: torch.Tensor,
        epoch: int,
        generator: torch.Generator,
    ) -> tuple[float, float]:
        """``train_iteration`` MixMatch steps on the split (``epoch``: the ramp's epoch); the mean Lx and Lu."""
        device, k = data.device, data.num_classes
        xs = Cycler(torch.nonzero(labelled).flatten(), self.semi_batch_size, generator)
        us = Cycler(torch.nonzero(~labelled).flatten(), self.semi_batch_size, generator)
        images = data.train.images
        model.train()
        total_x = total_u = 0.0
        for i in range(self.train_iteration):
            xi, ui = xs.next(), us.next()
            x = data.augment(images[xi].to(device).float().div_(255.0))
            xt = F.one_hot(data.train.labels[xi].to(device), k).float()
            u = images[ui].to(device).float().div_(255.0)
            u1, u2 = data.augment(u), data.augment(u)
            with torch.no_grad():
                ut = sharpen((F.softmax(model(u1), 1) + F.softmax(model(u2), 1)) / 2, self.mixmatch_temperature)
            lam = float(np.random.beta(self.mixmatch_alpha, self.mixmatch_alpha))
            lam = max(lam, 1 - lam)
            inputs, targets = torch.cat([x, u1, u2]), torch.cat([xt, ut, ut])
            mixed, mixed_targets = mixup(inputs, targets, lam, torch.randperm(len(inputs), generator=generator))
            logits = model(mixed)
            b = len(x)
            lx, lu = mixmatch_loss(logits[:b], mixed_targets[:b], logits[b:], mixed_targets[b:])
            weight = self.lambda_u * rampup(epoch + i / self.train_iteration, self.rampup_length)
            loss = lx + weight * lu
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_x, total_u = total_x + lx.item(), total_u + lu.item()
        return total_x / self.train_iteration, total_u / self.train_iteration


if __name__ == "__main__":
    main("dbd")
