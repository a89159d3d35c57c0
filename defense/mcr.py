"""MCR: Mode Connectivity Repair. Zhao, Chen, Das, Ramamurthy and Lin, "Bridging Mode
Connectivity in Loss Landscapes and Adversarial Robustness", ICLR 2020 (arXiv:2005.00060).

Idea: two models that both fit the clean data are joined by a path of low clean loss
(mode connectivity, Garipov et al. 2018), and along that path, away from its end points,
the backdoor fades while the clean accuracy stays. MCR fits a quadratic Bezier curve

    phi_theta(t) = (1 - t)^2 w_0 + 2 t (1 - t) theta + t^2 w_1,    t in [0, 1],

between two end models w_0 and w_1, training only the control point theta on the
defender's clean subset: each batch draws t ~ U(0, 1) and takes a step on
CE(f(x; phi_theta(t)), y), whose gradient in theta is 2 t (1 - t) times the gradient at
phi_theta(t). The purified model is the curve's point at a fixed t.

End points, as BackdoorBench: w_0 is the backdoored model itself and w_1 the backdoored
model fine-tuned on the same clean subset (SGD, ``ft_epochs`` at ``ft_lr``, cosine); theta
starts at their midpoint (w_0 + w_1) / 2, so the untrained curve is the straight segment.
The end points stay fixed. The purified model is phi_theta(t) with BatchNorm statistics
recomputed at that point on the clean subset.

Hyperparameters (BackdoorBench's config/defense/mcr/; cifar10, cifar100, gtsrb and its
default are equal):
    t: the point of the curve returned (BackdoorBench's test_t: 0.1)
    epochs: curve-training epochs (BackdoorBench's train_curve_epochs: 100; tiny: 200)
    batch_size: batch size of both trainings (128)
    lr: SGD learning rate of the curve, cosine schedule (3e-5)
    momentum: SGD momentum of both trainings (0.9)
    weight_decay: SGD weight decay of both trainings (5e-4)
    lr_scheduler: per-epoch schedule of the curve training, CosineAnnealingLR or none
    ft_epochs: epochs of the fine-tuning that makes w_1 (100; tiny: 200)
    ft_lr: its SGD learning rate (0.01)
    ft_lr_scheduler: its schedule (CosineAnnealingLR)
Every batch of both trainings uses the dataset's train transform, as BackdoorBench's loader.

Deviations from BackdoorBench:
* BatchNorm at t: the running statistics are reset and recomputed as an exact average over
  one pass of the clean subset at phi_theta(t) (the paper's code, after Garipov et al.'s
  update_bn); BackdoorBench keeps the statistics accumulated while training the curve at
  random t and adds one pass with momentum 0.1.
* Only the quadratic Bezier curve (BackdoorBench's num_bends 3 and curve Bezier, its
  configs' only values); its PolyChain option is not offered. Its per-batch print and its
  evaluation of every epoch on the test sets are left to the harness.
* The cosine schedule of the curve has T_max = ``epochs`` (BackdoorBench: cos_t_max 100,
  equal for all but tiny). Tiny's ReduceLROnPlateau for the fine-tuning is not offered:
  cosine takes its place.
* The fine-tuning of w_1 is not reported (its epochs are not rows of mcr_df.csv); the rows
  are the curve's epochs, each the curve's point at t. No --resume: a run restarts.

    python defense/mcr.py --result_file badnet_digits
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import copy
import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from defense.base import Defense, DefenseData, main, register_defense
from defense.finetune import fine_tune, sgd_loop
from utils import config as cfg

log = logging.getLogger("saubench")

Weights = dict[str, torch.Tensor]


def bezier_coefficients(t: float | torch.Tensor) -> torch.Tensor:
    """The quadratic Bezier weights ((1 - t)^2, 2 t (1 - t), t^2) of w_0, theta and w_1."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return torch.stack([(1 - t) ** 2, 2 * t * (1 - t), t**2])


def curve_point(w_0: Weights, theta: Weights, w_1: Weights, t: float | torch.Tensor) -> Weights:
    """phi_theta(t) for every parameter name (differentiable in ``theta``)."""
    c = bezier_coefficients(t)
    return {
        name: c[0].to(w_0[name]) * w_0[name] + c[1].to(w_0[name]) * theta[name] + c[2].to(w_0[name]) * w_1[name]
        for name in w_0
    }


def parameters_of(model: nn.Module) -> Weights:
    """A detached copy of every parameter of ``model``, by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, data: DefenseData, batch_size: int, generator: torch.Generator) -> None:
    """Reset every BatchNorm layer's running statistics and set them to the exact average
    over one pass of the clean subset (train transform), as the paper's update_bn."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return
    saved = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    try:
        for x, _ in data.batches(batch_size, augment=True, generator=generator):
            with data.autocast():
                model(x)
    finally:
        for m, momentum in zip(layers, saved):
            m.momentum = momentum
        model.eval()


@register_defense("mcr")
class MCR(Defense):
    """MCR (Zhao et al., ICLR 2020): a Bezier curve from the backdoored model to its fine-tuned copy, taken at t.

    Args:
        t: the point of the curve returned (0: the backdoored model, 1: the fine-tuned one)
        epochs: curve-training epochs
        batch_size: batch size of the fine-tuning and the curve training
        lr: SGD learning rate of the curve's control point
        momentum: SGD momentum (both trainings)
        weight_decay: SGD weight decay (both trainings)
        lr_scheduler: per-epoch schedule of the curve training
        ft_epochs: epochs of the fine-tuning that makes the second end point
        ft_lr: SGD learning rate of that fine-tuning
        ft_lr_scheduler: per-epoch schedule of that fine-tuning
    """

    paper = (
        "Zhao, Chen, Das, Ramamurthy and Lin, Bridging Mode Connectivity in Loss Landscapes and Adversarial "
        "Robustness, ICLR 2020"
    )
    year = 2020
    kind = "mitigation"
    param_aliases = {
        "t": ("test_t",),
        "epochs": ("train_curve_epochs",),
        "momentum": ("sgd_momentum",),
        "weight_decay": ("wd",),
    }
    param_checks = {
        "t": cfg.unit_interval,
        "epochs": cfg.non_negative,
        "batch_size": cfg.positive,
        "lr": cfg.positive,
        "momentum": cfg.non_negative,
        "weight_decay": cfg.non_negative,
        "ft_epochs": cfg.non_negative,
        "ft_lr": cfg.positive,
    }
    search_space = {"t": ("float", 0.05, 0.5)}
    smoke_params = {"epochs": 2, "ft_epochs": 2}

    def __init__(
        self,
        t: float = 0.1,
        epochs: int = 100,
        batch_size: int = 128,
        lr: float = 3e-5,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_scheduler: Literal["CosineAnnealingLR", "none"] = "CosineAnnealingLR",
        ft_epochs: int = 100,
        ft_lr: float = 0.01,
        ft_lr_scheduler: Literal["CosineAnnealingLR", "none"] = "CosineAnnealingLR",
    ):
        self.t, self.epochs, self.batch_size, self.lr = t, epochs, batch_size, lr
        self.momentum, self.weight_decay, self.lr_scheduler = momentum, weight_decay, lr_scheduler
        self.ft_epochs, self.ft_lr, self.ft_lr_scheduler = ft_epochs, ft_lr, ft_lr_scheduler

    def mitigate(self, model: nn.Module, data: DefenseData) -> nn.Module:
        w_0 = parameters_of(model)
        tuned = fine_tune(
            copy.deepcopy(model),
            data,
            epochs=self.ft_epochs,
            lr=self.ft_lr,
            batch_size=self.batch_size,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            lr_scheduler=self.ft_lr_scheduler,
            report=False,
            seed_offset=1,
        )
        w_1 = parameters_of(tuned)
        del tuned
        theta = {name: ((w_0[name] + w_1[name]) / 2).requires_grad_(True) for name in w_0}
        loop = sgd_loop(
            model,
            data,
            epochs=self.epochs,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            lr_scheduler=self.lr_scheduler,
            params=list(theta.values()),
            resume=False,
        )
        work = copy.deepcopy(model)  # holds the BatchNorm statistics while the curve trains
        for p in work.parameters():
            p.requires_grad_(False)
        for epoch in range(self.epochs):
            work.train()
            total, seen = 0.0, 0
            for x, y in data.batches(self.batch_size, augment=True, generator=loop.generator):
                t = torch.rand((), generator=loop.generator)
                with data.autocast():
                    logits = functional_call(work, curve_point(w_0, theta, w_1, t), (x,))
                loss = F.cross_entropy(logits.float(), y)
                data.check(loss, epoch=epoch, batch=seen // self.batch_size)
                loop.step(loss)
                total, seen = total + loss.item() * len(y), seen + len(y)
            loop.end_epoch()
            self.take_point(model, w_0, theta, w_1, data)
            data.report(epoch, model, curve_loss=total / max(seen, 1))
        if self.epochs == 0:
            self.take_point(model, w_0, theta, w_1, data)
        log.info("mcr: the curve's point at t = %g", self.t)
        return model.eval()

    def take_point(self, model: nn.Module, w_0: Weights, theta: Weights, w_1: Weights, data: DefenseData) -> None:
        """Load phi_theta(t) into ``model`` and recompute its BatchNorm statistics there."""
        with torch.no_grad():
            point = curve_point(w_0, theta, w_1, self.t)
            for name, p in model.named_parameters():
                p.copy_(point[name])
        recompute_batchnorm(model, data, self.batch_size, data.generator(2))


if __name__ == "__main__":
    main("mcr")
