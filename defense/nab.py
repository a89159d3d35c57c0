"""NAB: Non-Adversarial Backdoor. Liu, Sangiovanni-Vincentelli and Yue, "Beating Backdoor
Attack at Its Own Game", ICCV 2023 (arXiv:2307.15539); BackdoorBench's version
(defense/nab.py, config/defense/nab/).

Idea: fight a backdoor with a backdoor. The defender detects the samples that look poisoned,
relabels them, and stamps its own (defensive) trigger on those whose label changed; the model
trained on that set learns "defensive trigger -> true label". At test time every input gets
the defensive trigger, which takes precedence over the attacker's trigger, while clean inputs
keep their prediction.

The steps, as BackdoorBench runs them:
1. SimCLR self-supervised pre-training of a backbone on the training set as delivered
   (``epoch_self`` epochs, defense/simclr.py; SGD lr ``lr_self`` 0.4, momentum 0.9, weight
   decay 1e-4, cosine schedule with T_max ``self_t_max`` 1000 stepped each epoch, batch
   ``batch_size_self`` 512, temperature 0.5); views drawn for the whole batch at once with
   per-image parameters (``simclr_augment: batched``; ``per_image``: torchvision v2 image by image).
2. Detection by local gradient ascent (LGA, ABL's isolation loss in its flooding form
   ``|L - gamma| + gamma``) on a fresh model of the recipe's architecture, without
   augmentation (``epoch_lga`` epochs, SGD lr ``lr_lga`` 0.01 with BackdoorBench's cosine
   factor ``0.5 (1 + cos(pi e / (epoch_lga + 80)))`` after each epoch, momentum 0.9,
   weight decay 5e-4, batch ``batch_size_lga`` 64); the ``detect_ratio`` (0.1) share of
   samples with the lowest loss is taken as suspicious.
3. Relabelling by the self-supervised model: the class centroids of the projections of the
   samples outside the ``centroid_ratio`` (0.2) lowest losses, each suspicious sample given
   the class of the nearest centroid (Euclidean).
4. Training a fresh model on the relabelled set with the train transform; a suspicious
   sample whose label changed gets the defensive trigger after the transform. The trigger:
   the top-left ``trigger_size`` x ``trigger_size`` (2) pixels of every channel set to the
   dataset's mean (BackdoorBench sets them to 0 after normalisation, the same pixels).
   Recipe: ``epochs`` (100), ``batch_size`` (256), ``lr`` (0.01), ``sgd_momentum`` (0.9),
   ``wd`` (1e-4), no schedule (``lr_scheduler: none``); each None: the attack's recipe.
5. At test time the defensive trigger is stamped on every input: the returned model is a
   :class:`StampedClassifier`, a Classifier of the record's architecture whose first step
   is the stamp, so the harness evaluates it like every other defense's model. The saved
   weights are the architecture's; the trigger is saved in the result's extras
   (``defensive_trigger``: the value image and its mask).

Deviations from BackdoorBench:
* BackdoorBench's outer loop steps the self-supervised stage's scheduler, not its own
  optimiser's, so its final training runs at a constant rate; here that is said outright
  (``lr_scheduler: none``).
* The SSL backbone is a fresh model of the record's architecture (its penultimate layer)
  rather than BackdoorBench's separate DBD networks; the augmentation's deviations:
  defense/simclr.py.
* The per-sample losses are computed in eval mode in batches (BackdoorBench: batches of 64,
  eval mode; the same numbers).
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import logging
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from defense.base import main, register_defense
from defense.simclr import SIMCLR_ARGS, SIMCLR_CHECKS, SelfModel, SimCLRStage, embed
from defense.training import Held, Phases, Recipe, TrainingDefense, TrainingSet
from utils import config as cfg
from utils.models import Classifier

log = logging.getLogger("saubench")


def _ratio(value: float) -> str | None:
    return None if 0.0 < value < 1.0 else "must be in (0, 1)"


class Stamp(nn.Module):
    """Sets the pixels where ``mask`` is 1 to ``value`` (both (C, H, W), float images in [0, 1]);
    the tensors are buffers that are not saved in the state_dict."""

    def __init__(self, value: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("value", value.float(), persistent=False)
        self.register_buffer("mask", mask.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 - self.mask) + self.value * self.mask


def defensive_trigger(channels: int, size: tuple[int, int], mean, trigger_size: int = 2) -> Stamp:
    """BackdoorBench's defensive trigger: the top-left ``trigger_size`` square of every channel
    set to the channel's mean (0 after normalisation)."""
    mask = torch.zeros(channels, *size)
    mask[:, :trigger_size, :trigger_size] = 1.0
    value = torch.tensor([float(m) for m in mean]).view(-1, 1, 1).expand(channels, *size).clone()
    return Stamp(value, mask)


class StampedClassifier(Classifier):
    """A Classifier whose first step stamps the defensive trigger on every input: the harness
    evaluates the test-time transformation as part of the model. Its state_dict is the
    plain Classifier's (the stamp's buffers are not saved)."""

    def __init__(self, model: Classifier, stamp: Stamp):
        super().__init__(
            model.spec, model.net, model.normalize.mean.flatten().tolist(), model.normalize.std.flatten().tolist()
        )
        self.masks = model.masks
        self._mask_hooks = model._mask_hooks
        self.stamp = stamp.to(next(model.parameters()).device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.stamp(x))


def lowest(losses: torch.Tensor, ratio: float) -> torch.Tensor:
    """The indices of the ``int(ratio * N)`` lowest losses (BackdoorBench's count), sorted."""
    return torch.argsort(losses, stable=True)[: int(len(losses) * ratio)].sort().values


def lga_rate(lr: float, epoch: int, epochs: int) -> float:
    """BackdoorBench's LGA learning rate after epoch ``epoch`` (0-based) of ``epochs``."""
    return 0.5 * (1 + math.cos(math.pi * epoch / (epochs + 80))) * lr


def nearest_centroid_labels(
    features: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Every sample's nearest class centroid (Euclidean), the centroids being the mean
    features of the ``reference`` samples (a boolean mask) of each class by their label.
    A class with no reference sample has no centroid."""
    keep = reference.bool()
    centroids = torch.full((num_classes, features.shape[1]), float("inf"))
    for c in range(num_classes):
        members = keep & (labels == c)
        if members.any():
            centroids[c] = features[members].mean(0)
    distance = torch.cdist(features, centroids.nan_to_num(posinf=1e30))
    return distance.argmin(1)


@register_defense("nab")
class NAB(TrainingDefense):
    __doc__ = (
        "NAB: detect (LGA), relabel (SimCLR centroids), stamp a defensive trigger in training and at test.\n\n"
        "    Args:\n"
        + SIMCLR_ARGS
        + """epoch_lga: LGA detection epochs
        gamma: LGA's flooding level
        lr_lga: LGA learning rate
        batch_size_lga: LGA batch size
        detect_ratio: share of the lowest LGA losses taken as suspicious
        centroid_ratio: share of the lowest LGA losses left out of the class centroids
        trigger_size: side of the defensive trigger's square (pixels)
        epochs: final training epochs (None: the attack's recipe)
        batch_size: final training batch size (None: the attack's recipe)
        lr: final training learning rate (None: the attack's recipe)
        sgd_momentum: final training SGD momentum (None: the attack's recipe)
        wd: final training weight decay (None: the attack's recipe)
        lr_scheduler: final training schedule (None: the attack's recipe)
"""
    )

    paper = "Liu, Sangiovanni-Vincentelli and Yue, Beating Backdoor Attack at Its Own Game, ICCV 2023, arXiv:2307.15539"
    year = 2023
    param_checks = {
        **SIMCLR_CHECKS,
        "epoch_lga": cfg.non_negative,
        "lr_lga": cfg.positive,
        "batch_size_lga": cfg.positive,
        "detect_ratio": _ratio,
        "centroid_ratio": _ratio,
        "trigger_size": cfg.positive,
    }
    smoke_params = {"epoch_self": 1, "epoch_lga": 1, "epochs": 1}

    def __init__(
        self,
        epoch_self: int = 100,
        batch_size_self: int = 512,
        lr_self: float = 0.4,
        self_t_max: int = 1000,
        temperature: float = 0.5,
        epoch_lga: int = 20,
        gamma: float = 0.5,
        lr_lga: float = 0.01,
        batch_size_lga: int = 64,
        detect_ratio: float = 0.1,
        centroid_ratio: float = 0.2,
        trigger_size: int = 2,
        epochs: int | None = 100,
        batch_size: int | None = 256,
        lr: float | None = 0.01,
        sgd_momentum: float | None = 0.9,
        wd: float | None = 1e-4,
        lr_scheduler: str | None = "none",
        simclr_augment: Literal["batched", "per_image"] = "batched",
    ):
        self.epoch_self, self.batch_size_self, self.lr_self = epoch_self, batch_size_self, lr_self
        self.self_t_max, self.temperature, self.simclr_augment = self_t_max, temperature, simclr_augment
        self.epoch_lga, self.gamma, self.lr_lga, self.batch_size_lga = epoch_lga, gamma, lr_lga, batch_size_lga
        self.detect_ratio, self.centroid_ratio, self.trigger_size = detect_ratio, centroid_ratio, trigger_size
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.sgd_momentum, self.wd, self.lr_scheduler = sgd_momentum, wd, lr_scheduler

    def phases(self, recipe: Recipe) -> Phases:
        return Phases(("self", self.epoch_self), ("lga", self.epoch_lga), ("train", recipe.epochs))

    def total_epochs(self, recipe: Recipe) -> int:
        return self.phases(recipe).total

    def train(self, data: TrainingSet) -> nn.Module:
        info, simclr = data.info, SimCLRStage(self)
        self_model, self_optimizer, self_scheduler, augmentation = simclr.build(data.new_model(), data)
        ascent, model = data.new_model(), data.new_model()
        lga_optimizer = torch.optim.SGD(ascent.parameters(), lr=self.lr_lga, momentum=0.9, weight_decay=5e-4)
        optimizer = data.recipe.optimizer(model.parameters())
        scheduler = data.recipe.scheduler(optimizer)
        generator, held = data.generator(), Held()
        start = data.resume(
            model=model,
            self_model=self_model,
            ascent=ascent,
            optimizers=[self_optimizer, lga_optimizer, optimizer],
            schedulers=[s for s in (self_scheduler, scheduler) if s is not None],
            generator=generator,
            held=held,
        )
        trigger = defensive_trigger(info.channels, info.size, info.mean, self.trigger_size).to(data.device)
        stamped = StampedClassifier(model, trigger)  # what the harness evaluates: the test-time stamp included
        phases = self.phases(data.recipe)
        for epoch in range(start, phases.total):
            phase, e = phases.of(epoch)
            if phase == "self":
                loss = simclr.epoch(self_model, data, self_optimizer, self_scheduler, augmentation, epoch, generator)
                data.report(epoch, stamped, simclr_loss=loss)
            elif phase == "lga":

                def step(x, y):
                    logits = ascent(x)
                    return (F.cross_entropy(logits, y) - self.gamma).abs() + self.gamma, logits, y  # flooding

                stats = data.train_epoch(
                    ascent,
                    lga_optimizer,
                    epoch=epoch,
                    augment=False,
                    step=step,
                    generator=generator,
                    batch_size=self.batch_size_lga,
                    desc=f"LGA {e}",
                )
                for group in lga_optimizer.param_groups:
                    group["lr"] = lga_rate(self.lr_lga, e, self.epoch_lga)
                data.report(epoch, stamped, lga_loss=stats["train_epoch_loss_avg_over_batch"])
            else:
                if "labels" not in held:
                    held["suspicious"], held["labels"] = self.relabel(data, ascent, self_model)
                stats = self.train_epoch(data, model, optimizer, held, trigger, epoch, generator)
                if scheduler is not None:
                    scheduler.step()
                data.report(epoch, stamped, train_loss=stats["train_epoch_loss_avg_over_batch"])
        # the suspicious and relabelled training indices (none when no epoch ran past the relabelling),
        # and the defensive trigger (value, mask)
        suspicious = held.get("suspicious")
        relabelled = (
            torch.nonzero(held["labels"] != data.train.labels).flatten()
            if "labels" in held
            else torch.zeros(0, dtype=torch.long)
        )
        data.add_extras(
            suspicious=suspicious,
            relabelled=relabelled,
            defensive_trigger=torch.stack([trigger.value.cpu(), trigger.mask.cpu()]),
        )
        data.add_summary(suspicious=len(suspicious), relabelled=len(relabelled))
        return stamped.eval()

    def relabel(
        self, data: TrainingSet, ascent: Classifier, self_model: SelfModel
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The suspicious samples (lowest LGA losses) and every sample's training label: the
        nearest SimCLR class centroid for the suspicious ones, the delivered label otherwise."""
        losses = data.losses(ascent)
        suspicious = lowest(losses, self.detect_ratio)
        reference = torch.ones(len(data), dtype=torch.bool)
        reference[lowest(losses, self.centroid_ratio)] = False
        self_model.eval()
        projections = embed(self_model, data)
        nearest = nearest_centroid_labels(projections, data.train.labels, reference, data.num_classes)
        labels = data.train.labels.clone()
        labels[suspicious] = nearest[suspicious]
        log.info(
            "NAB: %d suspicious samples (lowest LGA loss), %d relabelled",
            len(suspicious),
            int((labels != data.train.labels).sum()),
        )
        return suspicious, labels

    @staticmethod
    def train_epoch(
        data: TrainingSet,
        model: Classifier,
        optimizer: torch.optim.Optimizer,
        held: Held,
        trigger: Stamp,
        epoch: int,
        generator: torch.Generator,
    ) -> dict[str, float]:
        """One epoch on the relabelled set with the train transform; the samples whose label
        changed carry the defensive trigger (stamped after the transform)."""
        labels = held["labels"]
        changed = labels != data.train.labels

        def step(x, index):
            index = index.cpu()
            y = labels[index].to(x.device)
            stamp = changed[index].to(x.device)
            x = torch.where(stamp[:, None, None, None], trigger(x), x)
            logits = model(x)
            return F.cross_entropy(logits, y), logits, y

        return data.train_epoch(
            model,
            optimizer,
            labels=torch.arange(len(data)),
            epoch=epoch,
            step=step,
            generator=generator,
            desc=f"train {epoch}",
        )


if __name__ == "__main__":
    main("nab")
