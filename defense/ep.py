"""EP: Entropy-based Pruning. Zheng, Tang, Li and Liu, "Pre-activation Distributions
Expose Backdoor Neurons", NeurIPS 2022.

Idea: on a mixture of benign and poisoned samples, a backdoor neuron's pre-activations
form two well separated populations (the poisoned ones far from the rest), which lowers
the differential entropy of the neuron's standardised pre-activation distribution. EP
feeds a batch to the model and, for every BN channel, takes the maximum of the BN layer's
input over the channel's positions for each image (``batch_feats``), standardises these
values over the batch, estimates their entropy with a histogram of bin width 0.1, and
prunes, within each BN layer, the channels whose entropy is below mean - u * std of the
layer's entropies (their BN weight and bias are set to zero). Nothing is trained.

Hyperparameters (BackdoorBench's config/defense/ep/):
    u: the threshold in standard deviations below the layer's mean (3; tiny: 4)
    batch_size: size of the batch (256), drawn at random (seeded), with the dataset's train
        transform, as BackdoorBench's shuffled loader; the whole subset when it is smaller

The entropy estimate is BackdoorBench's ``batch_entropy``: the bins start at the minimum
over the whole layer (all channels), their number is int((max - min) / 0.1) over the whole
layer, a value counts in a bin when strictly inside it, and the entropy is
-sum_b p_b log p_b (empty bins contribute 0).

Deviations from the paper and BackdoorBench, and what they mean:
* The data. EP assumes the defender holds the infected training set (unlabelled): the
  paper's and BackdoorBench's batch is the first shuffled batch of the *poisoned* training
  set, so that backdoor neurons see both populations. This project's mitigation harness
  hands a defense only the defender's clean subset (``DefenseData``), so EP runs on a batch
  of it: the computation is BackdoorBench's, but with no poisoned samples in the batch the
  bimodality it looks for is absent, and the channels it prunes are the low-entropy ones
  of clean data. Treat its results as EP under the clean-subset threat model, not as the
  paper's EP; a faithful EP needs the harness to pass the poisoned training set (as the
  data-detection kind does) and is left for that.
* BackdoorBench also evaluates u = 0, 0.5, ..., 10 on the test sets; here only the
  configured u is applied (a defense sees no test data).
* LayerNorm models (convnext_tiny, vit_b_16) are refused (BackdoorBench treats LayerNorm
  like BN there); only BatchNorm2d channels are scored.

    python defense/ep.py --result_file badnet_digits
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


def batch_feats(x: torch.Tensor) -> torch.Tensor:
    """The BN input ``x`` (N x C x H x W) reduced to C x N: each channel's maximum over its
    positions, per image."""
    return x.reshape(x.shape[0], x.shape[1], -1).max(-1).values.permute(1, 0).float()


def batch_entropy(feats: torch.Tensor, step_size: float = 0.1) -> torch.Tensor:
    """BackdoorBench's histogram entropy of each row of ``feats`` (C x N): bins of width
    ``step_size`` from the minimum over all of ``feats``, int((max - min) / step_size) of
    them, values strictly inside a bin counted; -sum p log p per row."""
    lo, hi = feats.min(), feats.max()
    n_bars = int((hi - lo) / step_size)
    entropy = torch.zeros(feats.shape[0], device=feats.device)
    for n in range(n_bars):
        num = ((feats > lo + n * step_size) & (feats < lo + (n + 1) * step_size)).sum(-1)
        p = num / feats.shape[-1]
        entropy -= p * p.log().nan_to_num(0.0, posinf=0.0, neginf=0.0)
    return entropy


def channel_entropy(x: torch.Tensor, step_size: float = 0.1) -> torch.Tensor:
    """EP's score of each channel of the BN input ``x``: the entropy of its standardised
    per-image maxima."""
    feats = batch_feats(x)
    feats = (feats - feats.mean(-1, keepdim=True)) / feats.std(-1, keepdim=True)
    return batch_entropy(feats.nan_to_num(0.0, posinf=0.0, neginf=0.0), step_size)


@register_defense("ep")
class EP(Defense):
    """Entropy-based Pruning (Zheng et al., NeurIPS 2022): prune neurons with outlying low pre-activation entropy.

    Args:
        u: prune a neuron whose entropy is below its layer's mean by u standard deviations
        batch_size: size of the batch whose pre-activations are measured
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
        layers = require_batchnorm(model, "EP")
        n, inputs = inputs_on_one_batch(model, layers, data, self.batch_size)
        outcome = Pruned("entropy")  # extras: each BN layer's entropies and pruned neurons
        for name, bn in layers:
            entropy = channel_entropy(inputs[name])
            index = outliers(entropy, self.u, upper=False)
            zero_channels(bn, index)
            outcome.add(name, entropy, index)
        outcome.hand_over(data)
        log.info("ep: %d of %d neurons pruned (u = %g, %d images)", outcome.count, outcome.total, self.u, n)
        return model


if __name__ == "__main__":
    main("ep")
