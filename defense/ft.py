"""FT: fine-tuning on the defender's clean data. The fine-tuning baseline of Liu,
Dolan-Gavitt and Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep
Neural Networks", RAID 2018 (arXiv:1805.12185), in BackdoorBench's configuration (Wu et
al., "BackdoorBench: A Comprehensive Benchmark of Backdoor Learning", NeurIPS 2022
Datasets and Benchmarks; defense/ft.py, config/defense/ft/).

Idea: retrain every weight of the backdoored model with the ordinary cross-entropy on the
defender's small clean subset. Nothing in the clean data activates the trigger, so
updating the weights on it may overwrite the backdoor; Liu et al. show that on its own
this often leaves the backdoor in place, which is why FT is the baseline for fine-pruning
(defense/fp.py), NAD (defense/nad.py) and the rest.

Hyperparameters (BackdoorBench's config/defense/ft/config.yaml):
    epochs: fine-tuning epochs (100)
    batch_size: batch size (256)
    lr: SGD learning rate at the start of the schedule (0.01)
    momentum: SGD momentum (0.9; BackdoorBench's sgd_momentum)
    weight_decay: SGD weight decay (5e-4; BackdoorBench's wd)
    lr_scheduler: per-epoch schedule, CosineAnnealingLR or none (CosineAnnealingLR)
Every epoch uses the dataset's train transform (random crop, and flip where declared), as
BackdoorBench's train loader does.

Deviations:
* BackdoorBench's cosine schedule always has T_max = 100 epochs, whatever ``epochs`` is;
  here T_max = ``epochs``, so a shorter run still anneals to zero (identical at 100).
* BackdoorBench's tiny config uses ReduceLROnPlateau for 200 epochs; the shared loop
  (defense.finetune) offers cosine or a constant rate, so config/defense/ft/tiny.yaml
  keeps 200 epochs with the cosine schedule.
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

from typing import Literal

from torch import nn

from defense.base import Defense, DefenseData, main, register_defense
from defense.finetune import fine_tune
from utils import config as cfg


@register_defense("ft")
class FT(Defense):
    """Fine-tuning (FT): retrain all weights on the defender's clean subset with cross-entropy.

    Args:
        epochs: fine-tuning epochs
        batch_size: batch size
        lr: SGD learning rate at the start of the schedule
        momentum: SGD momentum
        weight_decay: SGD weight decay
        lr_scheduler: per-epoch learning-rate schedule
    """

    paper = (
        "Liu, Dolan-Gavitt and Garg, Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural "
        "Networks, RAID 2018, arXiv:1805.12185 (fine-tuning baseline; BackdoorBench's configuration)"
    )
    year = 2018
    search_space = {
        "lr": ("float_log", 1e-3, 1e-1),
        "weight_decay": ("float_log", 1e-5, 1e-3),
        "epochs": ("int", 10, 100),
    }
    param_aliases = {"momentum": ("sgd_momentum",), "weight_decay": ("wd",)}
    param_checks = {
        "epochs": cfg.non_negative,
        "batch_size": cfg.positive,
        "lr": cfg.positive,
        "momentum": cfg.non_negative,
        "weight_decay": cfg.non_negative,
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
    ):
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.momentum, self.weight_decay, self.lr_scheduler = momentum, weight_decay, lr_scheduler

    def mitigate(self, model: nn.Module, data: DefenseData) -> nn.Module:
        return fine_tune(
            model,
            data,
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            lr_scheduler=self.lr_scheduler,
        )


if __name__ == "__main__":
    main("ft")
