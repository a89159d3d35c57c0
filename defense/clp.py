"""CLP: Channel Lipschitzness-based Pruning. Zheng, Tang, Li and Liu, "Data-free Backdoor
Removal based on Channel Lipschitzness", ECCV 2022 (arXiv:2208.03111).

Idea: a backdoor makes a few channels react strongly to a small trigger, so the map from
the layer's input to such a channel has a large Lipschitz constant. CLP needs no data: for
each output channel k of a convolution followed by BatchNorm, the channel's map is
x -> gamma_k / sigma_k * (W_k * x) + const, whose Lipschitz constant is bounded by the
upper bound of the channel Lipschitz constant (UCLC)

    UCLC_k = || W_k * |gamma_k| / sigma_k ||_2,

the spectral norm of the channel's kernel W_k reshaped to (in_channels, kh * kw) and
scaled by the BN weight gamma_k over the running standard deviation sigma_k. Within each
layer, the channels with UCLC_k > mean + u * std (of the layer's UCLCs) are pruned: their
BN weight and bias are set to zero. Nothing is trained.

Hyperparameters (BackdoorBench's config/defense/clp/ and the paper's):
    u: the threshold in standard deviations above the layer's mean (3; BackdoorBench's
        tiny config: 5)

Which convolution goes with a BatchNorm layer: as BackdoorBench (and the authors' code),
the last ``Conv2d`` before it in module order. In a pre-activation ResNet that convolution
is the one whose output (plus the shortcut) the BN normalises; the bound then ignores the
shortcut, as theirs does. A BN layer whose preceding convolution has another number of
output channels (or none) is skipped and logged. the result's extras (``data.add_extras``) hold each layer's UCLCs and
pruned channels; ``data.add_summary`` adds the counts to summary.json.

Deviations from BackdoorBench:
* BackdoorBench also evaluates u = 0, 0.5, ..., 10 on the test sets and plots the curve;
  a defense here sees no test data, so only the configured u is applied.
* sigma_k is sqrt(running_var) without BN's eps, as BackdoorBench and the authors' code
  (a channel with zero running variance gets an infinite bound and is pruned).
* Models without BatchNorm2d (convnext_tiny, vit_b_16) are refused; BackdoorBench's CLP
  silently prunes nothing on them.

    python defense/clp.py --result_file badnet_digits
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import logging
from typing import Any

import torch
from torch import nn

from defense.base import Defense, DefenseData, main, register_defense
from defense.bnprune import Pruned, outliers, require_batchnorm, zero_channels
from utils import config as cfg

log = logging.getLogger("saubench")


@torch.no_grad()
def channel_lipschitz(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """UCLC_k for every output channel k: the spectral norm of conv.weight[k] reshaped to
    (in_channels / groups, kh * kw), times |gamma_k| / sqrt(running_var_k). A float32
    vector of length ``bn.num_features``."""
    W = conv.weight.detach().float()
    scale = (bn.weight.detach().float() / bn.running_var.float().sqrt()).abs()
    W_k = W.reshape(W.shape[0], W.shape[1], -1) * scale[:, None, None]
    return torch.linalg.matrix_norm(W_k, ord=2)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, nn.Conv2d, str, nn.BatchNorm2d]]:
    """(conv name, conv, BN name, BN) for each BatchNorm2d layer and the last Conv2d before it
    in module order, where their channel counts agree (BackdoorBench's pairing)."""
    pairs, conv, conv_name = [], None, ""
    bns = {id(m) for _, m in require_batchnorm(model, "CLP")}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            conv, conv_name = module, name
        elif id(module) in bns:
            if conv is None or conv.out_channels != module.num_features:
                log.info(
                    "clp: %s skipped (no preceding convolution with %d output channels)", name, module.num_features
                )
                continue
            pairs.append((conv_name, conv, name, module))
    return pairs


@register_defense("clp")
class CLP(Defense):
    """Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022): data-free, prune channels with outlying UCLC.

    Args:
        u: prune a channel whose Lipschitz upper bound exceeds its layer's mean by u standard deviations
    """

    paper = (
        "Zheng, Tang, Li and Liu, Data-free Backdoor Removal based on Channel Lipschitzness, ECCV 2022, "
        "arXiv:2208.03111"
    )
    year = 2022
    kind = "mitigation"
    param_checks = {"u": cfg.non_negative}
    smoke_params: dict[str, Any] = {}
    search_space = {"u": ("float", 1.0, 6.0)}

    def __init__(self, u: float = 3.0):
        self.u = u

    def mitigate(self, model: nn.Module, data: DefenseData) -> nn.Module:
        model.eval()
        # extras: each pruned layer's channel Lipschitz upper bounds and pruned channels
        outcome = Pruned("uclc", unit="channels")
        for _, conv, bn_name, bn in conv_bn_pairs(model):
            uclc = channel_lipschitz(conv, bn)
            index = outliers(uclc, self.u)
            zero_channels(bn, index)
            outcome.add(bn_name, uclc, index)
        outcome.hand_over(data)
        log.info("clp: %d of %d channels pruned (u = %g)", outcome.count, outcome.total, self.u)
        return model


if __name__ == "__main__":
    main("clp")
