"""Channel pruning through BatchNorm layers: the pieces CLP, BNP and EP share (Zheng et
al.'s three pruning defenses, as BackdoorBench implements them). Not a defense itself: it
registers nothing.

Each of these methods gives every output channel of a ``BatchNorm2d`` layer a score, marks
the channels whose score is an outlier within their layer (beyond the layer's mean by
``u`` standard deviations) and prunes them by zeroing the layer's affine weight and bias,
so that the channel outputs zero before its activation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from utils.errors import UserError


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """The model's ``BatchNorm2d`` layers with affine weights and running statistics, in
    module order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and m.affine and m.track_running_stats
    ]


def require_batchnorm(model: nn.Module, method: str) -> list[tuple[str, nn.BatchNorm2d]]:
    """``batchnorm_layers(model)``, or a UserError saying that ``method`` does not apply."""
    layers = batchnorm_layers(model)
    if not layers:
        name = getattr(model, "name", type(model).__name__)
        raise UserError(
            f"{method} prunes the channels of BatchNorm2d layers; model '{name}' has none, "
            "so it does not apply (use a model with BatchNorm, e.g. preactresnet18 or cnn)"
        )
    return layers


def outliers(score: torch.Tensor, u: float, upper: bool = True) -> torch.Tensor:
    """Boolean selection of the channels whose ``score`` exceeds the layer's mean + u * std
    (``upper``) or falls below mean - u * std; std is the sample standard deviation
    (``Tensor.std``, as BackdoorBench). Strict inequalities, so a layer whose scores are
    all equal selects nothing."""
    score = score.float()
    mean, std = score.mean(), score.std()
    return score > mean + u * std if upper else score < mean - u * std


@torch.no_grad()
def zero_channels(bn: nn.BatchNorm2d, index: torch.Tensor) -> None:
    """Prune the selected channels of ``bn``: zero their affine weight and bias (as
    BackdoorBench's CLP, BNP and EP do)."""
    index = index.to(bn.weight.device)
    bn.weight[index] = 0.0
    bn.bias[index] = 0.0


@dataclass
class Pruned:
    """What a pruning defense hands the harness: each layer's scores (``<score_key>.<bn>``)
    and pruned neurons (``pruned.<bn>``) as extras, and the counts for summary.json."""

    score_key: str
    unit: str = "neurons"
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    by_layer: dict[str, int] = field(default_factory=dict)
    total: int = 0
    more: dict[str, Any] = field(default_factory=dict)

    def add(self, layer: str, score: torch.Tensor, pruned: torch.Tensor) -> None:
        self.extras[f"{self.score_key}.{layer}"] = score.detach().cpu()
        self.extras[f"pruned.{layer}"] = pruned.cpu()
        self.by_layer[layer] = int(pruned.sum())
        self.total += len(score)

    @property
    def count(self) -> int:
        return sum(self.by_layer.values())

    def summary(self) -> dict[str, Any]:
        """The counts for summary.json."""
        return {
            f"pruned_{self.unit}": self.count,
            f"total_{self.unit}": self.total,
            **self.more,
            "pruned_by_layer": dict(self.by_layer),
        }

    def hand_over(self, data: Any) -> None:
        """Give the scores and pruned neurons (extras) and the counts (summary) to the
        harness through ``data`` (the DefenseData the method was given)."""
        data.add_extras(**self.extras)
        data.add_summary(**self.summary())


def inputs_on_one_batch(
    model: nn.Module, layers: list[tuple[str, nn.Module]], data: Any, batch_size: int
) -> tuple[int, dict[str, torch.Tensor]]:
    """Each layer's input on one seeded, train-transformed batch of the defender's data
    (``data``: the harness's DefenseData; BackdoorBench takes the first batch of its
    shuffled loader): the batch's size and the inputs by layer name."""
    model.eval()
    x, _ = next(iter(data.batches(batch_size, augment=True, generator=data.generator())))
    with torch.no_grad(), capture_inputs(layers) as inputs, data.autocast():
        model(x)
    return len(x), inputs


@contextmanager
def capture_inputs(layers: list[tuple[str, nn.Module]]) -> Iterator[dict[str, torch.Tensor]]:
    """While the context is open, every forward pass stores each layer's input (float32,
    detached) under the layer's name in the yielded dict, replacing the previous one."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in layers:

        def hook(_module, inputs, _name=name):
            seen[_name] = inputs[0].detach().float()

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
