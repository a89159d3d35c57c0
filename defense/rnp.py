"""RNP: Reconstructive Neuron Pruning. Li, Lyu, Ma, Chen, Koren, Li and Ma,
"Reconstructive Neuron Pruning for Backdoor Defense", ICML 2023.

Idea: unlearning a backdoored model on clean data (gradient *ascent* on the clean loss)
quickly destroys its clean accuracy, and it does so mostly through the clean neurons: the
backdoor neurons are left in place. Recovering the unlearned model with a neuron mask m in
[0, 1] (one per BN channel, multiplying its BN weight), trained on the same clean data
with the weights frozen, switches the clean neurons back on (m -> 1) and leaves the
backdoor neurons, which the clean loss does not need, with small masks. The neurons whose
mask is <= ``threshold`` are then pruned in the *original* backdoored model (their BN
weight set to zero).

Hyperparameters (BackdoorBench's defense/rnp.py defaults and config/defense/rnp/):
    unlearning_epochs: most epochs of unlearning (20)
    unlearning_lr: SGD rate of unlearning, momentum 0.9, weight decay 5e-4 (0.01), divided by
        10 after ``unlearning_decay_epoch`` epochs (10; BackdoorBench's MultiStepLR [10, 20])
    clean_threshold: unlearning stops after the first epoch whose training accuracy on the
        clean subset is <= this (0.2)
    recovering_epochs: epochs of mask recovery (20)
    recovering_lr: SGD rate of the masks, momentum 0.9 (0.2)
    alpha: weight of the clean loss in the recovery (0.2)
    threshold: prune every neuron whose mask is <= this (0.7: BackdoorBench's
        ``pruning_number`` with ``pruning_by threshold``)
    batch_size: batch size (256)
Every batch uses the dataset's train transform; BatchNorm uses batch statistics during
both phases (training mode), as in BackdoorBench. Unlearning and recovery run on a copy;
the returned model is the original one with the pruned BN weights zeroed (biases kept, as
BackdoorBench). the result's extras (``data.add_extras``) hold each layer's mask values and pruned channels;
summary.json the counts and the unlearning epochs used.

Deviations from BackdoorBench:
* BackdoorBench sweeps the threshold from 0 to 0.9 on the test sets (keeping the curve for
  its plots) and then prunes at ``pruning_number``; only the configured threshold is
  applied here (a defense sees no test data).
* BackdoorBench calls ``clip_grad_norm_(max_norm=20)`` before the backward pass, where it
  clips nothing; it is left out.
* Models without BatchNorm2d are refused (BackdoorBench supports a fixed list of models).

--resume: neither phase is checkpointed; an interrupted run starts again, from the same seed.

    python defense/rnp.py --result_file badnet_digits
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from defense.base import Defense, DefenseData, main, register_defense
from defense.bnprune import Pruned, require_batchnorm
from utils import config as cfg

log = logging.getLogger("saubench")


def masked_forward(
    model: nn.Module, layers: list[tuple[str, nn.BatchNorm2d]], masks: list[torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """``model(x)`` with each listed BN layer's weight multiplied by its mask (the bias unchanged)."""
    overrides = {f"{name}.weight": bn.weight * m for (name, bn), m in zip(layers, masks)}
    return functional_call(model, overrides, (x,), strict=False)


class MaskedView(nn.Module):
    """The unlearned model with the current masks: what the harness evaluates during recovery."""

    def __init__(self, model: nn.Module, layers: list[tuple[str, nn.BatchNorm2d]], masks: list[torch.Tensor]):
        super().__init__()
        self.model, self.layers, self.masks = model, layers, masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return masked_forward(self.model, self.layers, self.masks, x)


@register_defense("rnp")
class RNP(Defense):
    """Reconstructive Neuron Pruning (Li et al., ICML 2023): unlearn, recover neuron masks, prune the unrecovered.

    Args:
        unlearning_epochs: most epochs of gradient ascent on the clean subset
        unlearning_lr: SGD learning rate of the unlearning
        unlearning_decay_epoch: the unlearning rate is divided by 10 after this many epochs
        clean_threshold: stop unlearning once the epoch's clean training accuracy is at most this
        recovering_epochs: epochs of mask recovery on the unlearned model
        recovering_lr: SGD learning rate of the neuron masks
        alpha: weight of the clean loss in the recovery
        threshold: prune every neuron whose recovered mask is at most this
        batch_size: batch size of both phases
    """

    paper = "Li, Lyu, Ma, Chen, Koren, Li and Ma, Reconstructive Neuron Pruning for Backdoor Defense, ICML 2023"
    year = 2023
    kind = "mitigation"
    param_checks = {
        "unlearning_epochs": cfg.non_negative,
        "unlearning_lr": cfg.positive,
        "unlearning_decay_epoch": cfg.non_negative,
        "clean_threshold": cfg.unit_interval,
        "recovering_epochs": cfg.non_negative,
        "recovering_lr": cfg.positive,
        "alpha": cfg.positive,
        "threshold": cfg.unit_interval,
        "batch_size": cfg.positive,
    }
    smoke_params = {"unlearning_epochs": 2, "recovering_epochs": 2}
    search_space = {"threshold": ("float", 0.1, 0.9), "clean_threshold": ("float", 0.1, 0.5)}

    def __init__(
        self,
        unlearning_epochs: int = 20,
        unlearning_lr: float = 0.01,
        unlearning_decay_epoch: int = 10,
        clean_threshold: float = 0.2,
        recovering_epochs: int = 20,
        recovering_lr: float = 0.2,
        alpha: float = 0.2,
        threshold: float = 0.7,
        batch_size: int = 256,
    ):
        self.unlearning_epochs, self.unlearning_lr = unlearning_epochs, unlearning_lr
        self.unlearning_decay_epoch, self.clean_threshold = unlearning_decay_epoch, clean_threshold
        self.recovering_epochs, self.recovering_lr, self.alpha = recovering_epochs, recovering_lr, alpha
        self.threshold, self.batch_size = threshold, batch_size

    def mitigate(self, model: nn.Module, data: DefenseData) -> nn.Module:
        require_batchnorm(model, "RNP")
        work = copy.deepcopy(model)
        generator = data.generator()
        used = self.unlearn(work, data, generator)
        masks = self.recover(work, data, generator, epoch_offset=used)
        layers = require_batchnorm(model, "RNP")  # the original's layers, in the same order as the copy's
        # extras: each BN layer's recovered masks and pruned neurons
        outcome = Pruned("mask", more={"unlearning_epochs_used": used})
        with torch.no_grad():
            for (name, bn), m in zip(layers, masks):
                pruned = m.detach() <= self.threshold
                bn.weight[pruned] = 0.0
                outcome.add(name, m, pruned)
        outcome.hand_over(data)
        log.info(
            "rnp: %d of %d neurons pruned (mask <= %g) after %d unlearning epochs",
            outcome.count,
            outcome.total,
            self.threshold,
            used,
        )
        return model.eval()

    def unlearn(self, work: nn.Module, data: DefenseData, generator: torch.Generator) -> int:
        """Gradient ascent on the clean loss until the epoch's training accuracy is at most
        ``clean_threshold``; returns the number of epochs run."""
        optimizer = torch.optim.SGD(work.parameters(), lr=self.unlearning_lr, momentum=0.9, weight_decay=5e-4)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [self.unlearning_decay_epoch], gamma=0.1)
        for epoch in range(self.unlearning_epochs):
            work.train()
            total, correct, seen = 0.0, 0, 0
            for x, y in data.batches(self.batch_size, augment=True, generator=generator):
                with data.autocast():
                    logits = work(x)
                loss = F.cross_entropy(logits.float(), y)
                data.check(loss, epoch=epoch, batch=seen // self.batch_size)
                optimizer.zero_grad(set_to_none=True)
                (-loss).backward()  # no loss scaling (as before data.step): gradient ascent, plain SGD
                optimizer.step()
                total, correct, seen = (
                    total + loss.item() * len(y),
                    correct + int((logits.argmax(1) == y).sum()),
                    seen + len(y),
                )
            scheduler.step()
            train_acc = correct / max(seen, 1)
            data.report(epoch, work.eval(), unlearning_loss=total / max(seen, 1), train_acc=train_acc)
            if train_acc <= self.clean_threshold:
                return epoch + 1
        return self.unlearning_epochs

    def recover(
        self, work: nn.Module, data: DefenseData, generator: torch.Generator, epoch_offset: int = 0
    ) -> list[torch.Tensor]:
        """Masks on the unlearned model's BN weights, trained on alpha * the clean loss with
        the weights frozen and clipped to [0, 1] after each step; returns them."""
        layers = require_batchnorm(work, "RNP")
        for p in work.parameters():
            p.requires_grad_(False)
        masks = [torch.ones_like(bn.weight, requires_grad=True) for _, bn in layers]
        optimizer = torch.optim.SGD(masks, lr=self.recovering_lr, momentum=0.9)
        for epoch in range(self.recovering_epochs):
            work.train()
            total, correct, seen = 0.0, 0, 0
            for x, y in data.batches(self.batch_size, augment=True, generator=generator):
                with data.autocast():
                    logits = masked_forward(work, layers, masks, x)
                loss = self.alpha * F.cross_entropy(logits.float(), y)
                data.check(loss, epoch=epoch_offset + epoch, batch=seen // self.batch_size)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for m in masks:
                        m.clamp_(0.0, 1.0)
                total, correct, seen = (
                    total + loss.item() * len(y),
                    correct + int((logits.argmax(1) == y).sum()),
                    seen + len(y),
                )
            work.eval()
            data.report(
                epoch_offset + epoch,
                MaskedView(work, layers, masks),
                recovering_loss=total / max(seen, 1),
                train_acc=correct / max(seen, 1),
                mask_mean=float(torch.cat([m.detach().flatten() for m in masks]).mean()),
            )
        return masks


if __name__ == "__main__":
    main("rnp")
