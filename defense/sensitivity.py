"""Sample distinguishment by feature sensitivity, shared by D-BR (defense/dbr.py) and D-ST
(defense/dst.py): Chen, Wu and Wang, "Effective Backdoor Defense by Exploiting Sensitivity
of Poisoned Samples", NeurIPS 2022; BackdoorBench's utils/defense_utils/dbr/sd.py and
dataloader_bd.py. Not a defense itself: it registers nothing.

Poisoned samples are much more sensitive to transformations in the feature space of a
backdoored model than clean ones: a rotation and a translation change a clean sample's
features little but break the trigger. The SD stage (:class:`Distinguishment`) trains a
model on the training set as delivered without augmentation (``sd_epochs``, cross-entropy,
so that it is backdoored), fine-tunes its features with a loss that pushes the class
centres apart (``sd_finetune_epochs``: the mean cosine similarity between the normalised
centres of the batch's classes, BackdoorBench's ``L_intra``), and scores every sample by
its feature consistency under transformation (FCT): the mean squared difference between
the penultimate features of the image and of a transformed copy (``trans1`` then
``trans2``: a random rotation of up to 180 degrees, then a random translation of up to 20%
of the size). The ``clean_ratio`` share with the lowest FCT is taken as clean, the
``poison_ratio`` share with the highest as poisoned, the rest is uncertain.

Deviations from BackdoorBench:
* BackdoorBench draws the transformations twice, once for the thresholds and once to
  separate the samples; here one draw gives both (the separation is exactly the shares).
* The transformations are one affine map per sample applied with nearest-neighbour
  sampling and zero fill (torchvision's RandomRotation and RandomAffine defaults), in
  normalised coordinates (a rotation of a non-square image is stretched; every dataset
  here is square).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from defense.training import TrainingDefense, TrainingSet
from utils import config as cfg

log = logging.getLogger("saubench")

Transformation = Literal["rotate", "affine", "flip", "none"]


def affine_view(
    x: torch.Tensor, angle: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Images ``x`` (N, C, H, W) rotated by ``angle`` degrees, then shifted by ``tx``, ``ty``
    pixels (right, down), optionally mirrored first (``flip``, booleans); nearest-neighbour,
    zero fill."""
    n, _, h, w = x.shape
    a = torch.deg2rad(angle.to(x.device, torch.float32))
    cos, sin = torch.cos(a), torch.sin(a)
    sx = torch.ones(n, device=x.device) if flip is None else 1.0 - 2.0 * flip.to(x.device, torch.float32)
    txn, tyn = 2.0 * tx.to(x.device, torch.float32) / w, 2.0 * ty.to(x.device, torch.float32) / h
    # output -> input coordinates: mirror^-1 R^-1 (p - t)
    theta = torch.stack(
        [
            torch.stack([sx * cos, sx * sin, -sx * (cos * txn + sin * tyn)], 1),
            torch.stack([-sin, cos, sin * txn - cos * tyn], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def random_view(
    x: torch.Tensor, transformations: tuple[Transformation, ...], generator: torch.Generator
) -> torch.Tensor:
    """``x`` through the transformations, in order (rotate: up to 180 degrees either way;
    affine: a translation of up to 20% of the width and height, whole pixels; flip: a
    mirror image), with parameters drawn from ``generator`` (CPU) for each image."""
    n, _, h, w = x.shape
    angle, tx, ty = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    flip = torch.zeros(n, dtype=torch.bool)
    for t in transformations:
        if t == "rotate":
            angle = angle + (torch.rand(n, generator=generator) * 2 - 1) * 180.0
        elif t == "affine":
            tx = tx + torch.round((torch.rand(n, generator=generator) * 2 - 1) * 0.2 * w)
            ty = ty + torch.round((torch.rand(n, generator=generator) * 2 - 1) * 0.2 * h)
        elif t == "flip":
            flip = ~flip
    return affine_view(x, angle, tx, ty, flip)


@torch.no_grad()
def feature_sensitivity(
    model: nn.Module,
    data: TrainingSet,
    transformations: tuple[Transformation, ...],
    generator: torch.Generator,
    batch_size: int = 256,
) -> torch.Tensor:
    """FCT of every training sample, in order: the mean over feature dimensions of the
    squared difference between the penultimate features of the image and of its
    transformed copy ((N,) float32 on the CPU)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for x, _ in data.batches(batch_size):
            view = random_view(x, transformations, generator)
            out.append((model.penultimate(x) - model.penultimate(view)).pow(2).mean(1).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def thresholds(fct: torch.Tensor, clean_ratio: float, poison_ratio: float) -> tuple[float, float]:
    """BackdoorBench's gamma_low and gamma_high: the sorted FCT at ``int(N * clean_ratio)``
    and at ``N - int(N * poison_ratio)``."""
    ordered = fct.sort().values
    n = len(ordered)
    return float(ordered[min(int(n * clean_ratio), n - 1)]), float(ordered[min(n - int(n * poison_ratio), n - 1)])


def separate(fct: torch.Tensor, clean_ratio: float, poison_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The indices taken as clean (FCT <= gamma_low) and as poisoned (FCT >= gamma_high)."""
    low, high = thresholds(fct, clean_ratio, poison_ratio)
    return torch.nonzero(fct <= low).flatten(), torch.nonzero(fct >= high).flatten()


def centre_separation_loss(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """BackdoorBench's ``L_intra``: the mean of the cosine similarities between the centres of
    the classes present in the batch, the diagonal set to 0 (and counted in the mean)."""
    centres = torch.stack([features[labels == c].mean(0) for c in range(num_classes) if bool((labels == c).any())])
    centres = F.normalize(centres, dim=1)
    similarity = centres @ centres.T
    return similarity.masked_fill(torch.eye(len(centres), dtype=torch.bool, device=similarity.device), 0.0).mean()


def _ratio(value: float) -> str | None:
    return None if 0.0 <= value < 1.0 else "must be in [0, 1)"


class Distinguishment:
    """The SD stage's hyperparameters and steps (BackdoorBench's d-br/d-st values):
    ``sd_epochs`` (2) epochs of cross-entropy without augmentation, then
    ``sd_finetune_epochs`` (10) of the centre-separation loss, SGD (``sd_lr`` 0.01, momentum
    0.9, weight decay 5e-4, cosine schedule over 100 epochs stepped each epoch, as
    BackdoorBench's optimiser factory), batches of ``sd_batch_size`` (128); then the FCT
    split with ``clean_ratio`` (0.2) and ``poison_ratio`` (0.05) under ``trans1`` then ``trans2``."""

    PARAM_CHECKS = {
        "sd_epochs": cfg.non_negative,
        "sd_finetune_epochs": cfg.non_negative,
        "sd_lr": cfg.positive,
        "sd_batch_size": cfg.positive,
        "clean_ratio": _ratio,
        "poison_ratio": _ratio,
    }
    COSINE_T_MAX = 100

    def __init__(
        self,
        sd_epochs: int = 2,
        sd_finetune_epochs: int = 10,
        sd_lr: float = 0.01,
        sd_batch_size: int = 128,
        clean_ratio: float = 0.2,
        poison_ratio: float = 0.05,
        trans1: Transformation = "rotate",
        trans2: Transformation = "affine",
    ):
        self.sd_epochs, self.sd_finetune_epochs, self.sd_lr = sd_epochs, sd_finetune_epochs, sd_lr
        self.sd_batch_size, self.clean_ratio, self.poison_ratio = sd_batch_size, clean_ratio, poison_ratio
        self.trans1, self.trans2 = trans1, trans2

    def optimizer(self, model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        optimizer = torch.optim.SGD(model.parameters(), lr=self.sd_lr, momentum=0.9, weight_decay=5e-4)
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.COSINE_T_MAX)

    def epoch(
        self,
        data: TrainingSet,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        e: int,
        epoch: int,
        generator: torch.Generator,
    ) -> float:
        """SD epoch ``e`` (cross-entropy, then centre separation), without augmentation; its mean loss."""
        if e < self.sd_epochs:
            stats = data.train_epoch(
                model,
                optimizer,
                epoch=epoch,
                augment=False,
                generator=generator,
                batch_size=self.sd_batch_size,
                desc=f"SD train {e}",
            )
        else:

            def step(x, y):
                return centre_separation_loss(model.penultimate(x), y, data.num_classes), None, None

            stats = data.train_epoch(
                model,
                optimizer,
                epoch=epoch,
                augment=False,
                step=step,
                generator=generator,
                batch_size=self.sd_batch_size,
                desc=f"SD fine-tune {e - self.sd_epochs}",
            )
        scheduler.step()
        return stats["train_epoch_loss_avg_over_batch"]

    def split(
        self, data: TrainingSet, model: nn.Module, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean indices, poisoned indices) of the training set by FCT."""
        fct = feature_sensitivity(model, data, tuple(t for t in (self.trans1, self.trans2) if t != "none"), generator)
        clean, poisoned = separate(fct, self.clean_ratio, self.poison_ratio)
        log.info(
            "feature sensitivity: %d samples taken as clean, %d as poisoned, %d uncertain (of %d)",
            len(clean),
            len(poisoned),
            len(data) - len(clean) - len(poisoned),
            len(data),
        )
        return clean, poisoned

    @property
    def epochs(self) -> int:
        return self.sd_epochs + self.sd_finetune_epochs


# The Args lines of the SD stage's hyperparameters, for the class docstrings of D-BR and D-ST.
SD_ARGS = """        sd_epochs: SD epochs of cross-entropy without augmentation
        sd_finetune_epochs: SD epochs of the centre-separation loss
        sd_lr: SD learning rate
        sd_batch_size: SD batch size
        clean_ratio: share of the training set taken as clean (lowest FCT)
        poison_ratio: share of the training set taken as poisoned (highest FCT)
        trans1: first transformation of the FCT
        trans2: second transformation of the FCT
"""


class SensitivityDefense(TrainingDefense):
    """The base of D-BR and D-ST: their paper and the SD stage's hyperparameters."""

    paper = "Chen, Wu and Wang, Effective Backdoor Defense by Exploiting Sensitivity of Poisoned Samples, NeurIPS 2022"
    year = 2022

    def keep_split_params(
        self,
        sd_epochs: int,
        sd_finetune_epochs: int,
        sd_lr: float,
        sd_batch_size: int,
        clean_ratio: float,
        poison_ratio: float,
        trans1: Transformation,
        trans2: Transformation,
    ) -> None:
        """Keep the SD stage's hyperparameters as attributes and as :attr:`sd`."""
        self.sd_epochs, self.sd_finetune_epochs, self.sd_lr, self.sd_batch_size = (
            sd_epochs,
            sd_finetune_epochs,
            sd_lr,
            sd_batch_size,
        )
        self.clean_ratio, self.poison_ratio, self.trans1, self.trans2 = clean_ratio, poison_ratio, trans1, trans2
        self.sd = Distinguishment(
            sd_epochs, sd_finetune_epochs, sd_lr, sd_batch_size, clean_ratio, poison_ratio, trans1, trans2
        )
