"""FP: Fine-Pruning. Liu, Dolan-Gavitt and Garg, "Fine-Pruning: Defending Against
Backdooring Attacks on Deep Neural Networks", RAID 2018 (arXiv:1805.12185).

Idea: a backdoor tends to live in neurons that clean inputs leave dormant. Run the
defender's clean data (with the train transform, as BackdoorBench) through the model and
record the mean activation of every channel of the last convolutional layer (the model's
``feature_layer``, whose channels feed the classifier); prune channels in increasing order
of activation, one step at a time, while the clean accuracy stays within a tolerance of
the unpruned model's; then fine-tune the pruned model on the clean data (the pruned
channels stay at zero), which removes what pruning alone leaves of the backdoor.

Pruning is a 0/1 mask on the output channels of the feature layer
(``Classifier.set_mask``): the mask is a buffer of the model, so it is saved in
defense_result.pt with the weights and applied again whenever they are loaded. The
pruning order, the mean activations and the accuracy at each step are saved as extras;
summary.json gets ``pruned`` (channels pruned), ``channels`` and the held-out accuracies.

Hyperparameters (BackdoorBench's config/defense/fp/, except where noted):
    acc_ratio: largest tolerated relative drop of the clean accuracy while pruning (0.1)
    once_prune_ratio: fraction of the channels pruned per step; 0 prunes one channel a
        step, as the paper does (0; BackdoorBench: 0.01)
    val_ratio: fraction of the defender's clean data held out for the accuracy check (0.2;
        not in BackdoorBench, see below)
    epochs: fine-tuning epochs after pruning (100)
    batch_size: batch size of the activation pass and of fine-tuning (256)
    lr: SGD learning rate at the start of the cosine schedule (0.01)
    momentum: SGD momentum (0.9)
    weight_decay: SGD weight decay (5e-4)
    lr_scheduler: per-epoch schedule of fine-tuning (CosineAnnealingLR)
    rank_augment: the activation pass applies the dataset's train transform, one random
        draw per sample, as BackdoorBench's (its loader is the clean subset with the train
        transform; the model in eval mode) (on; off ranks on the images as they are)

Deviations from BackdoorBench that remain:
* Where the accuracy is measured. BackdoorBench checks the clean accuracy of each pruning
  step on the TEST set, which leaks test data into the defense. Here, as in the paper
  (the defender's validation data), it is measured on a held-out part of the defender's
  clean subset (``val_ratio``); the mean activations come from the other part, and
  fine-tuning uses all of it. A defense sees no test data (defense.base.DefenseData), so
  BackdoorBench's test-set check cannot be offered as a flag. ``val_ratio`` 0 ranks and
  checks on the whole subset, as the paper's single validation set does. The subset is
  drawn from the training set, so either way the accuracy is on samples the model was
  trained on (on badnet_digits, pruning 49 of 128 channels took it from 1.000 to 0.912,
  and the test accuracy from 0.986 to 0.947).
* Step size: the paper prunes one neuron at a time; BackdoorBench prunes
  ceil(0.01 * channels) per step (``--once_prune_ratio 0.01``).
* BackdoorBench's last accepted step prunes ``k - 1`` channels (an off-by-one), and the
  model it then fine-tunes is the same object as the one of the rejected step, so it keeps
  the first rejected mask. Here the model keeps the mask of the last accepted step, with
  exactly the number of channels reported.
* The tolerance is one-sided: a step is accepted while (acc_0 - acc) <= acc_ratio * acc_0.
  BackdoorBench uses |acc - acc_0| / acc_0 < acc_ratio, which would also stop on a rise.
* BackdoorBench masks the columns of the first linear layer after the pooled features;
  masking the feature layer's output channels is the same for models whose head is
  pooling then a linear layer (PreAct-ResNet18, ResNet18, the small CNN) and also works
  for heads with more layers (VGG, MobileNet).
* BackdoorBench's cosine schedule has T_max = 100 whatever ``epochs`` is; here T_max =
  ``epochs`` (identical at 100). Its tiny config uses ReduceLROnPlateau for 200 epochs;
  config/defense/fp/tiny.yaml keeps 200 epochs with the cosine schedule.

--resume: the pruning (a few forward passes) is done again, from the same seed, and the
fine-tuning goes on exactly from its checkpoint.
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import logging
import math
from typing import Literal

import torch
from torch import nn

from defense.base import Defense, DefenseData, main, register_defense
from defense.finetune import fine_tune
from utils import config as cfg
from utils.models import Classifier
from utils.train import predict

log = logging.getLogger("saubench")


@torch.no_grad()
def mean_activation(
    model: nn.Module, layer: nn.Module, data: DefenseData, batch_size: int = 256, augment: bool = False
) -> torch.Tensor:
    """The mean output of each channel of ``layer`` over ``data`` (over samples and
    positions), with the model in eval mode; a float32 vector on the CPU. With
    ``augment``, each image goes through the dataset's train transform first."""
    total: list[torch.Tensor] = []
    count = [0]

    def record(_module, _inputs, out):
        out = out.float()
        dims = [d for d in range(out.dim()) if d != 1]
        total.append(out.sum(dim=dims))
        count[0] += out.numel() // out.shape[1]

    was_training = model.training
    model.eval()
    handle = layer.register_forward_hook(record)
    try:
        for x, _ in data.batches(batch_size, shuffle=False, augment=augment):
            with data.autocast():
                model(x)
    finally:
        handle.remove()
        model.train(was_training)
    return (torch.stack(total).sum(0) / max(count[0], 1)).cpu()


def clean_accuracy(model: nn.Module, data: DefenseData) -> float:
    """Accuracy of ``model`` on all of ``data`` (no augmentation, eval mode)."""
    x, y = data.tensors()
    logits = predict(model, x, device=data.device, amp=data.amp)
    return int((logits.argmax(1) == y.cpu()).sum()) / len(y) if len(y) else 0.0


@register_defense("fp")
class FP(Defense):
    """Fine-Pruning (Liu et al., RAID 2018): prune the least active feature channels, then fine-tune.

    Args:
        acc_ratio: largest tolerated relative drop of the held-out clean accuracy while pruning
        once_prune_ratio: fraction of the feature channels pruned per step (0: one channel a step)
        val_ratio: fraction of the defender's clean data held out for the accuracy check (0: use all of it)
        epochs: fine-tuning epochs after pruning
        batch_size: batch size of the activation pass and of fine-tuning
        lr: SGD learning rate at the start of the schedule
        momentum: SGD momentum
        weight_decay: SGD weight decay
        lr_scheduler: per-epoch learning-rate schedule of fine-tuning
        rank_augment: rank the channels on train-transformed images, as BackdoorBench (off: the images as they are)
    """

    paper = (
        "Liu, Dolan-Gavitt and Garg, Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural "
        "Networks, RAID 2018, arXiv:1805.12185"
    )
    year = 2018
    search_space = {"acc_ratio": ("float", 0.02, 0.2), "lr": ("float_log", 1e-3, 1e-1), "epochs": ("int", 10, 100)}
    param_aliases = {"momentum": ("sgd_momentum",), "weight_decay": ("wd",)}
    param_checks = {
        "acc_ratio": cfg.unit_interval,
        "once_prune_ratio": cfg.unit_interval,
        "val_ratio": lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
        "epochs": cfg.non_negative,
        "batch_size": cfg.positive,
        "lr": cfg.positive,
        "momentum": cfg.non_negative,
        "weight_decay": cfg.non_negative,
    }
    smoke_params = {"epochs": 2, "once_prune_ratio": 0.05}

    def __init__(
        self,
        acc_ratio: float = 0.1,
        once_prune_ratio: float = 0.0,
        val_ratio: float = 0.2,
        epochs: int = 100,
        batch_size: int = 256,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_scheduler: Literal["CosineAnnealingLR", "none"] = "CosineAnnealingLR",
        rank_augment: bool = True,
    ):
        self.acc_ratio, self.once_prune_ratio, self.val_ratio = acc_ratio, once_prune_ratio, val_ratio
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.momentum, self.weight_decay, self.lr_scheduler = momentum, weight_decay, lr_scheduler
        self.rank_augment = rank_augment

    def mitigate(self, model: Classifier, data: DefenseData) -> nn.Module:
        self.prune(model, data)
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

    def prune(self, model: Classifier, data: DefenseData) -> int:
        """Mask the least active channels of the feature layer while the held-out clean
        accuracy stays within ``acc_ratio`` of the unpruned model's; returns how many."""
        layer = model.spec.feature_layer
        module = model.feature_module()
        rank_data, held_out = data.split(self.val_ratio) if self.val_ratio > 0 else (data, data)
        if len(rank_data) == 0:  # a subset too small to split: rank on all of it
            rank_data = data
        activation = mean_activation(model, module, rank_data, self.batch_size, augment=self.rank_augment)
        order = torch.argsort(activation, stable=True)  # least active first
        channels = len(order)
        step = max(1, math.ceil(channels * self.once_prune_ratio))

        def mask_of(k: int) -> torch.Tensor:
            mask = torch.ones(channels)
            mask[order[:k]] = 0.0
            return mask

        model.set_mask(layer, mask_of(0))  # replaces any mask the layer had
        acc_0 = clean_accuracy(model, held_out)
        pruned, acc_kept = 0, acc_0
        curve = [(0, acc_0)]
        for k in range(step, channels, step):  # at least one channel always stays
            model.set_mask(layer, mask_of(k))
            acc = clean_accuracy(model, held_out)
            curve.append((k, acc))
            if acc_0 - acc > self.acc_ratio * acc_0:
                break
            pruned, acc_kept = k, acc
        model.set_mask(layer, mask_of(pruned))
        log.info(
            "fine-pruning: %d of %d channels of %s pruned; held-out clean accuracy %.4f -> %.4f (%d samples)",
            pruned,
            channels,
            layer,
            acc_0,
            acc_kept,
            len(held_out),
        )
        # the pruning order (least active channel first), the mean activations, and the
        # held-out accuracy after each pruning step (prune_curve_acc at prune_curve_pruned channels)
        data.add_extras(
            prune_order=order,
            activation=activation,
            prune_curve_pruned=torch.tensor([k for k, _ in curve]),
            prune_curve_acc=torch.tensor([a for _, a in curve]),
        )
        data.add_summary(
            pruned=pruned,
            channels=channels,
            feature_layer=layer,
            held_out_samples=len(held_out),
            held_out_acc_unpruned=acc_0,
            held_out_acc_pruned=acc_kept,
        )
        return pruned


if __name__ == "__main__":
    main("fp")
