"""D-BR: backdoor removal after sample distinguishment by feature sensitivity. Chen, Wu and
Wang, "Effective Backdoor Defense by Exploiting Sensitivity of Poisoned Samples", NeurIPS
2022; BackdoorBench's version (defense/d-br.py, config/defense/d-br/).

Idea: poisoned samples' features change much more under a rotation and a translation than
clean samples' (the feature consistency towards transformations, FCT). The SD stage
(defense/sensitivity.py, shared with D-ST) trains a model without augmentation, sharpens
its features, and splits the training set into samples taken as clean (the lowest FCT,
``clean_ratio``), as poisoned (the highest, ``poison_ratio``) and uncertain. Backdoor
removal (BR) then takes the model trained on the poisoned set and, every epoch, unlearns
the samples taken as poisoned (gradient ascent on their cross-entropy) and relearns the
samples taken as clean (cross-entropy), both with the dataset's train transform.

Hyperparameters (BackdoorBench's config/defense/d-br/ and the values its code sets):
    sd_epochs (2), sd_finetune_epochs (10), sd_lr (0.01), sd_batch_size (128): the SD stage
    clean_ratio (0.2, alpha_c), poison_ratio (0.05, alpha_p), trans1 (rotate), trans2 (affine): the split
    br_epochs: unlearning-relearning epochs (20)
    br_lr: their SGD learning rate (1e-4), momentum (0.9), weight_decay (5e-4)
    br_batch_size: their batch size (128)
    epochs: epochs of the model trained before removal (None: the attack's recipe)

Deviations:
* BackdoorBench removes the backdoor from the attack record's model; a training-time
  defender holds no model, so the model is first trained here on the training set as
  delivered with the attack's recipe (the training that made the record's model, the
  defender's own run of it; ``epochs`` of them). The run's epochs are: that training,
  the SD stage, then BR.
* The SD stage's deviations: defense/sensitivity.py.
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import logging

import torch
import torch.nn.functional as F
from torch import nn

from defense.base import main, register_defense
from defense.sensitivity import SD_ARGS, Distinguishment, SensitivityDefense, Transformation
from defense.training import Held, Phases, Recipe, TrainingSet
from utils import config as cfg

log = logging.getLogger("saubench")


@register_defense("dbr", aliases=("d-br", "d_br"))
class DBR(SensitivityDefense):
    __doc__ = (
        "D-BR: split the training set by feature sensitivity; unlearn the poisoned part, relearn the clean part.\n\n"
        "    Args:\n"
        + SD_ARGS
        + """        br_epochs: unlearning-relearning epochs
        br_lr: their learning rate
        br_batch_size: their batch size
        momentum: their SGD momentum
        weight_decay: their SGD weight decay
        epochs: epochs of the model trained before removal (None: the attack's recipe)
"""
    )

    param_checks = {
        **Distinguishment.PARAM_CHECKS,
        "br_epochs": cfg.non_negative,
        "br_lr": cfg.positive,
        "br_batch_size": cfg.positive,
        "momentum": cfg.non_negative,
        "weight_decay": cfg.non_negative,
    }
    smoke_params = {"epochs": 1, "sd_epochs": 1, "sd_finetune_epochs": 1, "br_epochs": 1}

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
        br_epochs: int = 20,
        br_lr: float = 1e-4,
        br_batch_size: int = 128,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        epochs: int | None = None,
    ):
        self.keep_split_params(
            sd_epochs, sd_finetune_epochs, sd_lr, sd_batch_size, clean_ratio, poison_ratio, trans1, trans2
        )
        self.br_epochs, self.br_lr, self.br_batch_size = br_epochs, br_lr, br_batch_size
        self.momentum, self.weight_decay, self.epochs = momentum, weight_decay, epochs

    def phases(self, recipe: Recipe) -> Phases:
        return Phases(("train", recipe.epochs), ("sd", self.sd.epochs), ("br", self.br_epochs))

    def total_epochs(self, recipe: Recipe) -> int:
        return self.phases(recipe).total

    def train(self, data: TrainingSet) -> nn.Module:
        model, sd_model = data.new_model(), data.new_model()
        optimizer, scheduler = data.recipe.optimizer(model.parameters()), None
        scheduler = data.recipe.scheduler(optimizer)
        sd_optimizer, sd_scheduler = self.sd.optimizer(sd_model)
        br_optimizer = torch.optim.SGD(
            model.parameters(), lr=self.br_lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        generator, held = data.generator(), Held()
        start = data.resume(
            model=model,
            sd_model=sd_model,
            optimizers=[optimizer, sd_optimizer, br_optimizer],
            schedulers=[s for s in (scheduler, sd_scheduler) if s is not None],
            generator=generator,
            held=held,
        )
        phases = self.phases(data.recipe)
        for epoch in range(start, phases.total):
            phase, e = phases.of(epoch)
            if phase == "train":
                stats = data.train_epoch(model, optimizer, epoch=epoch, generator=generator, desc=f"train {e}")
                if scheduler is not None:
                    scheduler.step()
                data.report(epoch, model, train_loss=stats["train_epoch_loss_avg_over_batch"])
                continue
            if phase == "sd":
                loss = self.sd.epoch(data, sd_model, sd_optimizer, sd_scheduler, e, epoch, generator)
                data.report(epoch, model, sd_loss=loss)
                continue
            if "clean" not in held:
                held["clean"], held["poisoned"] = self.sd.split(data, sd_model, data.generator(1))
            unlearn, relearn = self.remove_epoch(data, model, br_optimizer, held, epoch, generator)
            data.report(epoch, model, unlearn_loss=unlearn, relearn_loss=relearn)
        # the training indices taken as clean and as poisoned (none when no epoch ran past the split)
        clean, poisoned = held.get("clean"), held.get("poisoned")
        data.add_extras(clean=clean, poisoned=poisoned)
        data.add_summary(taken_as_clean=len(clean), taken_as_poisoned=len(poisoned))
        return model.eval()

    def remove_epoch(
        self,
        data: TrainingSet,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        held: Held,
        epoch: int,
        generator: torch.Generator,
    ) -> tuple[float, float]:
        """One BR epoch: gradient ascent over the samples taken as poisoned, then descent over those
        taken as clean; their mean cross-entropies."""

        def ascent(x, y):
            logits = model(x)
            return -F.cross_entropy(logits, y), logits, y

        poisoned, clean = held["poisoned"], held["clean"]
        unlearn = data.train_epoch(
            model,
            optimizer,
            images=data.train.images[poisoned],
            labels=data.train.labels[poisoned],
            epoch=epoch,
            step=ascent,
            generator=generator,
            batch_size=self.br_batch_size,
            desc="unlearn",
        )
        relearn = data.train_epoch(
            model,
            optimizer,
            images=data.train.images[clean],
            labels=data.train.labels[clean],
            epoch=epoch,
            generator=generator,
            batch_size=self.br_batch_size,
            desc="relearn",
        )
        return -unlearn["train_epoch_loss_avg_over_batch"], relearn["train_epoch_loss_avg_over_batch"]


if __name__ == "__main__":
    main("dbr")
