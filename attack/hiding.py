"""Hiding networks shared by SSBA and Poison Ink: an encoder that hides a message in an image
as a bounded residual, and the loop that trains it with its reveal network on the dataset's
training images. Not an attack itself: it registers nothing.

The encoder is a small U-Net with one down-sampling level that works at any image size
(StegaStamp's encoder, which both attacks' reference code uses in some form, needs sides that
are multiples of 16):

    x' = clip(x + bound * tanh(U([x, m])), 0, 1),

``m`` the message as channels at the image's resolution (an edge watermark, or a bit string
spread by a linear layer), ``bound`` the largest change of a pixel. Images are float
N x C x H x W in [0, 1].
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("saubench")


class ResidualEncoder(nn.Module):
    """U-Net (one level) on ``[image, message]``: the image plus a residual of at most ``bound``.

    Args:
        channels: image channels C
        message_channels: channels of the message map (same H x W as the image)
        width: feature channels of the first level (the second has 2 * width)
        bound: largest change of a pixel, in [0, 1] units
    """

    def __init__(self, channels: int, message_channels: int, width: int = 32, bound: float = 16 / 255):
        super().__init__()
        self.bound = bound
        cin = channels + message_channels
        self.inc = nn.Sequential(nn.Conv2d(cin, width, 3, 1, 1), nn.ReLU(), nn.Conv2d(width, width, 3, 1, 1), nn.ReLU())
        self.down = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU(), nn.Conv2d(2 * width, 2 * width, 3, 1, 1), nn.ReLU()
        )
        self.up = nn.Sequential(
            nn.Conv2d(3 * width + cin, width, 3, 1, 1), nn.ReLU(), nn.Conv2d(width, width, 3, 1, 1), nn.ReLU()
        )
        self.out = nn.Conv2d(width, channels, 1)

    def residual(self, x: torch.Tensor, message: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """bound * tanh(U([x, message]) + skip): ``skip`` (image-shaped, optional) is added before the tanh."""
        inputs = torch.cat([x, message], 1)
        first = self.inc(inputs)
        second = F.interpolate(self.down(first), size=x.shape[-2:], mode="nearest")
        out = self.out(self.up(torch.cat([first, second, inputs], 1)))
        return self.bound * torch.tanh(out if skip is None else out + skip)

    def forward(self, x: torch.Tensor, message: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        return (x + self.residual(x, message, skip)).clamp(0, 1)


def conv_stack(cin: int, widths: Sequence[int], strides: Sequence[int], norm: bool = False) -> nn.Sequential:
    """3x3 convolutions with ReLU, ``widths[i]`` channels and stride ``strides[i]`` (with
    ``norm``, batch normalisation before each ReLU, as HiDDeN's blocks)."""
    layers: list[nn.Module] = []
    for width, stride in zip(widths, strides):
        layers += [nn.Conv2d(cin, width, 3, stride, 1), *([nn.BatchNorm2d(width)] if norm else []), nn.ReLU()]
        cin = width
    return nn.Sequential(*layers)


Loss = Callable[[torch.Tensor, int], tuple[torch.Tensor, dict[str, float]]]


def train_hiding(
    modules: Sequence[nn.Module],
    loss: Loss,
    images: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    betas: tuple[float, float],
    device: torch.device,
    generator: torch.Generator,
    name: str,
) -> dict[str, float]:
    """Minimise ``loss(batch, step)`` over ``modules`` with Adam for ``steps`` steps; each batch
    is ``batch_size`` uint8 ``images`` drawn by ``generator`` (epochs of shuffled passes), as
    float on ``device``. Returns the last step's statistics (``loss`` returns them with the
    loss); the modules are left in eval mode."""
    params = [p for module in modules for p in module.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr, betas=betas)
    for module in modules:
        module.to(device).train()
    order, at, stats = torch.randperm(len(images), generator=generator), 0, {}
    for step in range(steps):
        if at + batch_size > len(order):
            order, at = torch.randperm(len(images), generator=generator), 0
        batch = images[order[at : at + batch_size]].to(device).float().div_(255.0)
        at += batch_size
        value, stats = loss(batch, step)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        if (step + 1) % max(steps // 10, 1) == 0 or step + 1 == steps:
            log.info("%s: step %d/%d  %s", name, step + 1, steps, "  ".join(f"{k} {v:.4f}" for k, v in stats.items()))
    for module in modules:
        module.eval().requires_grad_(False)
    return stats


@torch.no_grad()
def in_batches(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device: torch.device, batch_size: int = 512
) -> torch.Tensor:
    """``fn`` over ``x`` in batches on ``device``; the result on ``x``'s device and dtype."""
    parts = [fn(x[start : start + batch_size].to(device).float()) for start in range(0, len(x), batch_size)]
    return torch.cat(parts).to(x.device, x.dtype) if parts else x.clone()
