"""Poisoning: which samples are poisoned, what their labels become, and the poisoned
views of a dataset.

A poisoned view is a clean split + poison indices + an image transform (the trigger,
applied to float [0, 1] images) + a label transform (all2one or all2all). Poisoned
images are quantised to uint8 when they are stored, as BackdoorBench stores PNGs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Literal, Mapping

import numpy as np
import torch

from utils.datasets import ImageData
from utils.errors import UserError

log = logging.getLogger("saubench")

Trigger = Callable[[torch.Tensor], torch.Tensor]  # float NCHW in [0, 1] -> same shape
LabelTrans = Literal["all2one", "all2all"]


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
        return {
            "images": self.images,
            "labels": self.labels.long(),
            "original_labels": self.original_labels.long(),
            "indices": self.indices.long(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, torch.Tensor]) -> "PoisonedSet":
        return cls(d["images"], d["labels"].long(), d["original_labels"].long(), d["indices"].long())


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [0, 1]."""
    return images.float().div_(255.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float in [0, 1] -> uint8 (rounded, clipped)."""
    return images.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def target_labels(labels: torch.Tensor, label_trans: LabelTrans, target: int, num_classes: int) -> torch.Tensor:
    """all2one: every label becomes ``target``; all2all: y -> (y + 1) mod C."""
    if label_trans == "all2one":
        return torch.full_like(labels, target)
    if label_trans == "all2all":
        return (labels + 1) % num_classes
    raise UserError(f"unknown label transform '{label_trans}' (all2one or all2all)")


def check_target(target: int, num_classes: int) -> None:
    if not 0 <= target < num_classes:
        raise UserError(f"attack_target {target} is not a class of this dataset (0..{num_classes - 1})")


def eligible(labels: torch.Tensor, label_trans: LabelTrans, target: int) -> torch.Tensor:
    """Samples whose label the attack changes: all2one skips the target class."""
    if label_trans == "all2one":
        return torch.nonzero(labels != target).flatten()
    return torch.arange(len(labels))


def select_poison_indices(
    labels: torch.Tensor,
    pratio: float,
    *,
    label_trans: LabelTrans,
    target: int,
    clean_label: bool,
    rng: np.random.Generator,
    exclude_target_class: bool = False,
) -> torch.Tensor:
    """Seeded choice of the poisoned training samples, sorted.

    Dirty-label: ``round(pratio * N)`` samples drawn from all N training samples, as
    BackdoorBench does (utils/backdoor_generate_poison_index.py: "in train state, all2one
    non-clean-label case NO NEED TO AVOID target class img"); under all2one a chosen
    target-class sample gets the trigger and keeps its label, and is one of the poison
    indices. With ``exclude_target_class`` (all2one only; this project's earlier rule)
    the draw skips the target class, so that every poisoned sample changes its label.
    Clean-label: ``round(pratio * N)`` samples of the target class, capped at its size
    with a warning (as BackdoorBench, which fails rather than caps).

    Remaining deviation: the draw uses ``rng`` (numpy's Generator), not BackdoorBench's
    global ``np.random.choice``, so the same seed chooses other samples."""
    n = len(labels)
    count = int(round(pratio * n))
    if clean_label:
        pool = torch.nonzero(labels == target).flatten()
    elif exclude_target_class:
        pool = eligible(labels, label_trans, target)
    else:
        pool = torch.arange(n)
    if count > len(pool):
        log.warning(
            "pratio %.3f asks for %d poisoned samples but only %d are eligible; using %d",
            pratio,
            count,
            len(pool),
            len(pool),
        )
        count = len(pool)
    if count == 0 and pratio > 0:
        raise UserError(f"pratio {pratio} poisons no sample of {n}")
    chosen = rng.choice(len(pool), size=count, replace=False)
    return pool[torch.from_numpy(np.sort(chosen))].sort().values


def apply_trigger(images: torch.Tensor, trigger: Trigger, batch_size: int = 1024) -> torch.Tensor:
    """Apply ``trigger`` to uint8 images in batches; returns uint8."""
    out = torch.empty_like(images)
    for start in range(0, len(images), batch_size):
        out[start : start + batch_size] = to_uint8(trigger(to_float(images[start : start + batch_size])))
    return out


def poisoned_set(data: ImageData, indices: torch.Tensor, trigger: Trigger, labels: torch.Tensor) -> PoisonedSet:
    """The samples ``indices`` of ``data`` with the trigger applied and ``labels``."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    return PoisonedSet(apply_trigger(data.images[idx], trigger), labels.long(), data.labels[idx].clone(), idx)


def bd_test_indices(labels: torch.Tensor, label_trans: LabelTrans, target: int) -> torch.Tensor:
    """The backdoor test set: every test sample whose label the attack changes."""
    return eligible(labels, label_trans, target)


def poisoned_training_set(clean: ImageData, bd_train: PoisonedSet | None) -> tuple[ImageData, torch.Tensor]:
    """The training split with the poisoned samples swapped in, and a 0/1 poison indicator."""
    indicator = torch.zeros(len(clean), dtype=torch.bool)
    if bd_train is None or len(bd_train) == 0:
        return clean, indicator
    images, labels = clean.images.clone(), clean.labels.clone()
    images[bd_train.indices] = bd_train.images
    labels[bd_train.indices] = bd_train.labels
    indicator[bd_train.indices] = True
    return ImageData(images, labels), indicator


def corner_patch(x: torch.Tensor, size: int, value: float = 1.0) -> torch.Tensor:
    """A ``size`` x ``size`` square of ``value`` in the bottom-right corner."""
    out = x.clone()
    out[..., -size:, -size:] = value
    return out


def batch_poison_count(pratio: float, batch_size: int, generator: torch.Generator | None = None) -> int:
    """How many samples of a batch a training-controlled attack poisons: ``int(pratio *
    batch_size)``; when that is below one, one sample with probability ``pratio *
    batch_size`` and none otherwise, so that low ratios still poison about ``pratio`` of
    the samples over an epoch (BackdoorBench's ``generalize_to_lower_pratio``)."""
    expected = pratio * batch_size
    if expected >= 1:
        return int(expected)
    return int(torch.rand((), generator=generator).item() < expected)
