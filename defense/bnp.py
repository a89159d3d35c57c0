"""BNP: BN statistics-based Pruning. Zheng, Tang, Li and Liu, "Pre-activation
Distributions Expose Backdoor Neurons", NeurIPS 2022.

Idea: a backdoor neuron's pre-activations on poisoned samples differ markedly from those
on benign samples. A BatchNorm layer's running statistics (mu_2, sigma_2^2) were gathered
on the infected training set, so for a backdoor neuron they describe a distribution
shifted by the poisoned samples, while the same neuron's statistics on the defender's
clean data (mu_1, sigma_1^2, the mean and variance of the BN layer's input over a batch
and its positions) describe the benign distribution. BNP models both as Gaussians and
scores every neuron (BN channel) by the Kullback-Leibler divergence

    KL_k = log(sigma_2 / sigma_1) + (sigma_1^2 + (mu_1 - mu_2)^2) / (2 sigma_2^2) - 1/2

(BackdoorBench's formula, with log(sigma_2^2 / sigma_1^2) for the first term), and prunes,
within each BN layer, the neurons with KL_k > mean + u * std of the layer's scores: their
BN weight and bias are set to zero. Nothing is trained; one batch of clean data is used.

Hyperparameters (BackdoorBench's config/defense/bnp/):
    u: the threshold in standard deviations above the layer's mean (3; tiny: 4)
    batch_size: size of the clean batch whose statistics are compared (256), drawn at
        random (seeded) from the defender's clean subset with the dataset's train transform,
        as BackdoorBench's shuffled loader; the whole subset when it is smaller

The model is in eval mode for the forward pass, so each layer's input comes from the
layers before it normalised with their running statistics, as in BackdoorBench.
the result's extras (``data.add_extras``) hold each layer's scores and pruned channels; summary.json the counts.

Deviations from BackdoorBench:
* For BatchNorm models BackdoorBench's statistics end up being those of a batch of the
  poisoned training set: its BN layers keep collecting after the clean batch, and a
  second forward pass (meant for its LayerNorm branch) on a poisoned training batch
  overwrites them. Here they are the clean batch's, as in the paper (and in
  BackdoorBench's LayerNorm branch); a mitigation defender holds no poisoned data anyway.
* BackdoorBench also evaluates u = 0, 0.5, ..., 10 on the test sets; here only the
  configured u is applied (a defense sees no test data).
* LayerNorm models (convnext_tiny, vit_b_16) are refused: BackdoorBench's LayerNorm branch
  compares clean and poisoned batches, data a mitigation defender does not have.

    python defense/bnp.py --result_file badnet_digits
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import logging
from typing import Any

import torch
from torch import nn

from defense.base import Defense, DefenseData, main, register_defense
from defense.bnprune import Pruned, inputs_on_one_batch, outliers, require_batchnorm, zero_channels
from utils import config as cfg

log = logging.getLogger("saubench")


def bn_kl_divergence(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """KL_k between N(mu_1, sigma_1^2), the per-channel mean and (unbiased) variance of the
    BN input ``x`` (N x C x H x W) over samples and positions, and N(mu_2, sigma_2^2), the
    layer's running statistics; a float32 vector of length C."""
    x = x.float()
    mean_1, var_1 = x.mean((0, 2, 3)), x.var((0, 2, 3))
    mean_2, var_2 = bn.running_mean.float(), bn.running_var.float()
    return (var_2 / var_1).log() + (var_1 + (mean_1 - mean_2).pow(2)) / (2 * var_2) - 0.5


@register_defense("bnp")
class BNP(Defense):
    """BN statistics-based Pruning (Zheng et al., NeurIPS 2022): prune neurons whose clean statistics diverge from BN's.

    Args:
        u: prune a neuron whose KL score exceeds its layer's mean by u standard deviations
        batch_size: size of the clean batch whose statistics are compared with the running ones
    """

    paper = "Zheng, Tang, Li and Liu, Pre-activation Distributions Expose Backdoor Neurons, NeurIPS 2022"
    year = 2022
    kind = "mitigation"
    param_checks = {"u": cfg.non_negative, "batch_size": cfg.positive}
    smoke_params: dict[str, Any] = {}
    search_space = {"u": ("float", 1.0, 6.0)}

    def __init__(self, u: float = 3.0, batch_size: int = 256):
        self.u, self.batch_size = u, batch_size

    def mitigate(self, model: nn.Module, data: DefenseData) -> nn.Module:
        layers = require_batchnorm(model, "BNP")
        n, inputs = inputs_on_one_batch(model, layers, data, self.batch_size)
        outcome = Pruned("kl")  # extras: each BN layer's KL scores and pruned neurons
        for name, bn in layers:
            kl = bn_kl_divergence(bn, inputs[name])
            index = outliers(kl, self.u)
            zero_channels(bn, index)
            outcome.add(name, kl, index)
        outcome.hand_over(data)
        log.info("bnp: %d of %d neurons pruned (u = %g, %d clean images)", outcome.count, outcome.total, self.u, n)
        return model


if __name__ == "__main__":
    main("bnp")
