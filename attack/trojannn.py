"""TrojanNN: Liu, Ma, Aafer, Lee, Zhai, Wang and Zhang, "Trojaning Attack on Neural
Networks", NDSS 2018.

The trigger is not chosen but generated: inside a fixed mask region, its pixels are
optimised on a clean model so that a few selected neurons of the penultimate layer (the
input of the last linear layer) fire strongly. The neurons are those most connected to
the next layer (largest sum of absolute outgoing weights), as in the paper. The trigger
is then stamped like BadNets' patch on a fraction ``pratio`` of the training images,
whose labels become the target (dirty-label):

    x' = x * (1 - mask) + trigger * mask.

Generating the trigger (BackdoorBench's, after TrojanZoo): start from the mask image
(white inside the mask), minimise sum_i (a_i(trigger * mask) - neuron_target_values)^2 over
the selected neurons i with ``mask_update_iters`` signed-gradient steps of size
``alpha``, projected to ``eps`` around the start and to [0, 1], stopping early below a
cost of 1e-3. The default mask is a square of ``mask_area`` of the image in the
bottom-right corner (TrojanNN's 7 % square; 2x2 on 8x8, 8x8 on 32x32); ``--mask_path``
takes an image file instead (its pixels brighter than 127, after a bilinear resize to the
input, form the mask). The clean model is the prototype record ``--clean_model`` (under
--record_root) or, by default, one trained in this run with the dataset's recipe. The
record keeps ``extras["mask"]`` (1 x H x W, 0/1), ``extras["trigger"]`` (C x H x W) and the
selected ``extras["neurons"]``.

Hyperparameters (BackdoorBench's config/attack/trojannn/preactresnet18.yaml and
pgd_with_mask_to_selected_neuron):
    num_neuron: 2, neuron_target_values: 100, mask_update_iters: 1000
    eps: 0.3, alpha: 0.1
    mask_area: 0.07 (the paper's square; BackdoorBench ships an apple-shaped mask file)

Deviations from the paper and BackdoorBench: no retraining from reverse-engineered data
(the victim is trained from scratch on poisoned data, as in BackdoorBench); the trigger
replaces the pixels in the mask (BackdoorBench adds it to the image in uint8, which can
wrap around); the selected layer is found automatically (the last linear layer).

    python attack/trojannn.py --dataset digits --save_folder_name trojannn_digits
    python attack/trojannn.py --dataset cifar10 --clean_model prototype_cifar10
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import logging
import math
from pathlib import Path

import torch
from torch import nn

from attack.base import Attack, AttackContext, main, register_attack
from utils.config import non_negative, positive, unit_interval
from utils.datasets import read_image
from utils.errors import UserError
from utils.train import check_finite

log = logging.getLogger("saubench")


def square_mask(size: tuple[int, int], area: float) -> torch.Tensor:
    """A (1, H, W) 0/1 mask: a square covering ``area`` of the image, bottom-right."""
    h, w = size
    side_h, side_w = (max(1, min(n, round(math.sqrt(area) * n))) for n in (h, w))
    mask = torch.zeros(1, h, w)
    mask[:, h - side_h :, w - side_w :] = 1
    return mask


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last linear layer (its classifier head)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"trojannn: model {type(model).__name__} has no linear layer to select neurons from")
    return linears[-1]


def most_connected(layer: nn.Linear, count: int) -> torch.Tensor:
    """Indices of the ``count`` inputs of ``layer`` with the largest sum of |weights|."""
    return layer.weight.detach().abs().sum(0).argsort(descending=True)[:count]


def neuron_trigger(
    model: nn.Module,
    start: torch.Tensor,
    mask: torch.Tensor,
    neurons: torch.Tensor,
    value: float,
    *,
    iters: int,
    eps: float,
    alpha: float,
    tolerance: float = 1e-3,
) -> torch.Tensor:
    """Signed-gradient descent on sum_i (a_i(x * mask) - value)^2, x within ``eps`` of
    ``start`` and in [0, 1]; ``a`` is the input of the model's last linear layer."""
    features: list[torch.Tensor] = []
    handle = last_linear(model).register_forward_hook(lambda module, inputs, output: features.append(inputs[0]))
    x = start.clone()
    try:
        for step in range(iters):
            x.requires_grad_(True)
            features.clear()
            model(x * mask)
            cost = (features[0][:, neurons].float() - value).pow(2).sum()
            check_finite(cost, 0, step, "TrojanNN trigger cost")
            (grad,) = torch.autograd.grad(cost, x)
            with torch.no_grad():
                x = (start + (x - alpha * grad.sign() - start).clamp(-eps, eps)).clamp(0, 1)
            if cost.item() < tolerance:
                break
    finally:
        handle.remove()
    log.info("TrojanNN trigger: neurons %s, cost %.4g after %d steps", neurons.tolist(), cost.item(), step + 1)
    return x.detach()


@register_attack("trojannn")
class TrojanNN(Attack):
    """TrojanNN: a trigger optimised to excite selected neurons, stamped in a mask, dirty-label.

    Args:
        clean_model: prototype record (under --record_root) to optimise the trigger on; none: train one here
        mask_path: image file whose bright pixels form the mask; none: a square in the bottom-right corner
        mask_area: area of the default square mask, as a fraction of the image
        num_neuron: selected neurons of the penultimate layer
        neuron_target_values: value the selected neurons are driven to
        mask_update_iters: optimisation steps of the trigger
        eps: largest change of a trigger pixel from its start (white)
        alpha: step size of the signed-gradient steps
    """

    kind = "dirty-label"
    paper = "Liu et al., Trojaning Attack on Neural Networks, NDSS 2018"
    year = 2018

    param_checks = {
        "mask_area": unit_interval,
        "num_neuron": positive,
        "mask_update_iters": non_negative,
        "eps": non_negative,
        "alpha": positive,
    }
    smoke_params = {"mask_update_iters": 20}

    def __init__(
        self,
        clean_model: str | None = None,
        mask_path: str | None = None,
        mask_area: float = 0.07,
        num_neuron: int = 2,
        neuron_target_values: float = 100.0,
        mask_update_iters: int = 1000,
        eps: float = 0.3,
        alpha: float = 0.1,
    ):
        if mask_path is not None and not Path(mask_path).is_file():
            raise ValueError(f"mask_path {mask_path}: no such file")
        self.clean_model = clean_model
        self.mask_path = mask_path
        self.mask_area = mask_area
        self.num_neuron = num_neuron
        self.neuron_target_values = neuron_target_values
        self.mask_update_iters = mask_update_iters
        self.eps = eps
        self.alpha = alpha
        self.mask: torch.Tensor | None = None  # (1, H, W) 0/1
        self.trigger: torch.Tensor | None = None  # (C, H, W)
        self.neurons = torch.zeros(0, dtype=torch.long)

    def make_mask(self, size: tuple[int, int]) -> torch.Tensor:
        if self.mask_path is None:
            return square_mask(size, self.mask_area)
        mask = torch.from_numpy(read_image(Path(self.mask_path), size, channels=1) > 127).float()
        if mask.sum() == 0:
            raise UserError(f"mask_path {self.mask_path}: no pixel brighter than 127, the mask is empty")
        return mask

    def prepare(self, ctx: AttackContext) -> None:
        info = ctx.dataset.info
        self.mask = self.make_mask(info.size)
        model = ctx.clean_model(self.clean_model).requires_grad_(False)
        head = last_linear(model)
        if self.num_neuron > head.in_features:
            raise UserError(f"num_neuron {self.num_neuron}: the penultimate layer has {head.in_features} neurons")
        self.neurons = most_connected(head, self.num_neuron).cpu()
        mask = self.mask.to(ctx.device)
        start = mask.expand(1, info.channels, *info.size).clone()  # white inside the mask
        trigger = neuron_trigger(
            model,
            start,
            mask,
            self.neurons.to(ctx.device),
            self.neuron_target_values,
            iters=self.mask_update_iters,
            eps=self.eps,
            alpha=self.alpha,
        )
        self.trigger = (trigger[0] * mask).cpu()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        mask, trigger = self.mask.to(x.device), self.trigger.to(x.device)
        return x * (1 - mask) + trigger * mask

    def extras(self) -> dict[str, torch.Tensor]:
        return {"mask": self.mask.clone(), "trigger": self.trigger.clone(), "neurons": self.neurons.clone()}


if __name__ == "__main__":
    main("trojannn")
