"""Image corruptions at five severities, on batches of float [0, 1] images (N, C, H, W) on
any device: the CIFAR-10-C parameterisation of Hendrycks and Dietterich, "Benchmarking
Neural Network Robustness to Common Corruptions and Perturbations", ICLR 2019
(make_cifar_c.py's constants, written for small images), for the corruptions that need
neither image files nor a minimum size. TeCo (defense/teco.py) reads them.

Why not a library: BackdoorBench's TeCo calls the ``imagecorruptions`` package (ImageNet-C
constants, HWC uint8 images one at a time, several corruptions that need images of
32 pixels or more); torchvision.transforms.v2 ships GaussianNoise, GaussianBlur and JPEG
but not the severity scales. Gaussian blur and JPEG below are torchvision's functions.

    from defense.corruptions import CORRUPTIONS, corrupt
    y = corrupt(x, "gaussian_noise", severity=3, generator=g)
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

# name -> the five severities' parameter (make_cifar_c.py)
LEVELS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # standard deviation
    "shot_noise": (500, 250, 100, 75, 50),  # photons per unit of intensity
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # salt-and-pepper amount
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma, in pixels
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to the value
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor around the image's mean
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # size factor of the downsampling
    "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
}


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator).to(x.device)


def _uniform(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(x.shape, generator=generator).to(x.device)


def gaussian_noise(x, c, generator):
    return x + c * _noise(x, generator)


def shot_noise(x, c, generator):
    return torch.poisson((x * c).cpu(), generator=generator).to(x.device) / c


def impulse_noise(x, c, generator):
    u = _uniform(x, generator)
    return torch.where(u < c / 2, torch.zeros_like(x), torch.where(u > 1 - c / 2, torch.ones_like(x), x))


def gaussian_blur(x, c, generator):
    from torchvision.transforms.v2.functional import gaussian_blur as blur

    size = min(2 * math.ceil(4 * c) + 1, 2 * (min(x.shape[-2:]) // 2) - 1)  # skimage's truncate 4, within the image
    return blur(x, [size, size], [c, c]) if size >= 3 else x


def brightness(x, c, generator):
    return x + c


def contrast(x, c, generator):
    mean = x.mean((1, 2, 3), keepdim=True)
    return (x - mean) * c + mean


def pixelate(x, c, generator):
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, int(h * c)), max(1, int(w * c))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


def jpeg_compression(x, c, generator):
    from torchvision.transforms.v2.functional import jpeg

    as_bytes = (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return jpeg(as_bytes, int(c)).to(x.device).float() / 255


FUNCTIONS: dict[str, Callable] = {
    f.__name__: f
    for f in (
        gaussian_noise,
        shot_noise,
        impulse_noise,
        gaussian_blur,
        brightness,
        contrast,
        pixelate,
        jpeg_compression,
    )
}
CORRUPTIONS: tuple[str, ...] = tuple(LEVELS)


def corrupt(x: torch.Tensor, name: str, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (float [0, 1], N x C x H x W) with corruption ``name`` at ``severity`` (1-5),
    clipped to [0, 1]; noise drawn from ``generator`` (a CPU generator)."""
    if name not in FUNCTIONS:
        raise ValueError(f"unknown corruption '{name}' (known: {', '.join(CORRUPTIONS)})")
    if not 1 <= severity <= len(LEVELS[name]):
        raise ValueError(f"severity must be in 1..{len(LEVELS[name])}, got {severity}")
    return FUNCTIONS[name](x, LEVELS[name][severity - 1], generator).clamp(0.0, 1.0)
