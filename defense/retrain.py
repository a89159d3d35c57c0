"""What a data detector's defender gets from acting on its verdict: the model retrained
from scratch on the training set as delivered minus the flagged samples, with the attack's
own recipe (defense.training's Recipe of the record: architecture, epochs, batch size,
optimiser, schedule), seeded by the run's seed. The harness (defense.base's detection run,
``--retrain``) evaluates it like every defense's model (C-Acc, ASR, RA).

    model = retrain_without(record, data, flagged, device, seed=0)
"""

from __future__ import annotations

import logging

import torch

from defense.training import delivered_set
from utils.datasets import Dataset
from utils.models import Classifier
from utils.records import AttackRecord
from utils.runtime import seed_everything

log = logging.getLogger("saubench")


def retrain_without(
    record: AttackRecord,
    data: Dataset,
    flagged: torch.Tensor,
    device: torch.device,
    *,
    seed: int = 0,
    amp: bool = False,
) -> Classifier:
    """A fresh model of the record's architecture trained with the record's recipe on the
    delivered training set without the ``flagged`` samples (N booleans, in order)."""
    held = delivered_set(record, data, device, amp, seed)
    keep = torch.nonzero(~flagged.bool().cpu()).flatten()
    recipe = held.recipe
    log.info(
        "retraining without the %d flagged samples: %d of %d, %d epochs of the attack's recipe",
        len(flagged) - len(keep),
        len(keep),
        len(held),
        recipe.epochs,
    )
    seed_everything(seed)
    model = held.new_model()
    optimizer = recipe.optimizer(model.parameters())
    scheduler = recipe.scheduler(optimizer)
    generator = torch.Generator().manual_seed(seed)
    images, labels = held.train.images[keep], held.train.labels[keep]
    for epoch in range(recipe.epochs):
        model.train()
        held.train_epoch(
            model, optimizer, images=images, labels=labels, epoch=epoch, generator=generator, desc="retrain"
        )
        if scheduler is not None:
            scheduler.step()
    return model.eval()
