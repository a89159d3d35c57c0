"""The retuning attack: does a purified model stay purified? Min, Qin, Zhang, Shen and
Cheng, "Uncovering, Explaining, and Mitigating the Superficial Safety of Backdoor
Defense", NeurIPS 2024.

A purified model can look clean (low ASR) and still sit close to the backdoored one in
weight space: a few steps of fine-tuning on a small set that mixes clean and poisoned
samples then bring the backdoor back, while a model trained clean would barely learn it
from so few poisoned samples. The harness runs this after a mitigation when asked
(``--retune``) and reports the retuned model's metrics beside the purified one's; the
purified model itself is left as it is.

The retuning set, drawn with the run's seed from the record's training data:
``RETUNE_RATIO`` of the training set (at least ``RETUNE_MIN`` samples), of which a
``POISON_SHARE`` share are poisoned training samples of the record (those whose label the
attack changed, or all of them for clean-label attacks) and the rest clean training
samples (not the clean versions of the chosen poisoned ones). Fine-tuning: SGD,
``EPOCHS`` epochs at ``LR``, momentum 0.9, weight decay 5e-4, batch ``BATCH_SIZE``, the
dataset's train transform.

These values are this project's reading of the paper's setting (a small retuning set
with a few poisoned samples, a few epochs), recalled, not checked against its text or code.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from utils.datasets import DatasetInfo, ImageData, train_transform
from utils.poison import PoisonedSet
from utils.runtime import grad_scaler
from utils.train import make_optimizer, train_epoch

log = logging.getLogger("saubench")

RETUNE_RATIO = 0.01
RETUNE_MIN = 100
POISON_SHARE = 0.1
EPOCHS = 5
LR = 0.01
BATCH_SIZE = 32


@dataclass
class RetuneSet:
    """The retuning samples: uint8 images and labels (poisoned ones first), and counts."""

    images: torch.Tensor
    labels: torch.Tensor
    poisoned: int
    clean: int


def retune_set(train: ImageData, poisoned: PoisonedSet | None, seed: int) -> RetuneSet | None:
    """The seeded retuning set (module docstring); None when the record keeps no poisoned
    training samples."""
    if poisoned is None or len(poisoned.labels) == 0:
        return None
    generator = torch.Generator().manual_seed(seed)
    size = max(RETUNE_MIN, round(RETUNE_RATIO * len(train)))
    changed = torch.nonzero(poisoned.labels != poisoned.original_labels).flatten()
    pool = changed if len(changed) else torch.arange(len(poisoned.labels))
    n_poison = min(len(pool), max(1, round(POISON_SHARE * size)))
    chosen = pool[torch.randperm(len(pool), generator=generator)[:n_poison]]
    taken = torch.zeros(len(train), dtype=torch.bool)
    taken[poisoned.indices[chosen]] = True
    free = torch.nonzero(~taken).flatten()
    n_clean = min(len(free), size - n_poison)
    clean = free[torch.randperm(len(free), generator=generator)[:n_clean]]
    images = torch.cat([poisoned.images[chosen], train.images[clean]])
    labels = torch.cat([poisoned.labels[chosen], train.labels[clean]])
    return RetuneSet(images, labels, n_poison, n_clean)


def retune(
    model: nn.Module, samples: RetuneSet, info: DatasetInfo, device: torch.device, seed: int, amp: bool = False
) -> nn.Module:
    """A copy of ``model`` fine-tuned on ``samples`` (``model`` is left unchanged)."""
    tuned = copy.deepcopy(model)
    for p in tuned.parameters():
        p.requires_grad_(True)
    optimizer = make_optimizer(tuned.parameters(), "sgd", LR, momentum=0.9, weight_decay=5e-4)
    scaler = grad_scaler(device, amp)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(EPOCHS):
        train_epoch(
            tuned,
            samples.images,
            samples.labels,
            optimizer,
            batch_size=BATCH_SIZE,
            device=device,
            epoch=epoch,
            augment=lambda x: train_transform(info, x),
            scaler=scaler,
            amp=amp,
            generator=generator,
            desc=f"retune {epoch}",
        )
    log.info("retuned on %d poisoned + %d clean training samples, %d epochs", samples.poisoned, samples.clean, EPOCHS)
    return tuned.eval()
