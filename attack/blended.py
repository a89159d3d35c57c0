"""Blended: Chen, Liu, Li, Lu and Song, "Targeted Backdoor Attacks on Deep Learning
Systems Using Data Poisoning", arXiv:1712.05526, 2017.

A key pattern is blended into a fraction ``pratio`` of the training images, whose labels
become the target:

    x' = (1 - alpha) * x + alpha * pattern,    alpha = 0.2 at training and test time.

The pattern: BackdoorBench blends a Hello Kitty picture, which cannot be shipped; the
default here is the paper's other key pattern, random noise: a fixed image of uniform
random pixels (uint8, drawn with ``pattern_seed``, one value per pixel and channel) at the
input's size. ``--pattern_path`` blends any image file instead (read with OpenCV, RGB or
grey as the dataset, resized bilinearly to the input). The pattern is kept in the record
(``extras["pattern"]``, uint8 CHW).

Hyperparameters (BackdoorBench's defaults):
    alpha: 0.2 (attack_train_blended_alpha = attack_test_blended_alpha)
    pattern_path: None (the seeded noise pattern)
    pattern_seed: 0

Deviation from BackdoorBench: one alpha for training and test (BackdoorBench has two
keys with the same default value); the default pattern is seeded noise, not Hello Kitty.

    python attack/blended.py --dataset digits --save_folder_name blended_digits
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

from pathlib import Path

import numpy as np
import torch

from attack.base import Attack, AttackContext, main, register_attack
from utils.config import non_negative, unit_interval
from utils.datasets import read_image


def noise_pattern(channels: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """A fixed uint8 (C, H, W) image of uniform random pixels."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, size=(channels, *size), dtype=np.uint8))


@register_attack("blended")
class Blended(Attack):
    """Blended: a key pattern blended into the image with weight alpha, dirty-label.

    Args:
        alpha: blend weight of the pattern, at training and test time
        pattern_path: image file to blend; none: a seeded uniform-noise pattern
        pattern_seed: seed of the default noise pattern
    """

    kind = "dirty-label"
    paper = "Chen et al., Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning, arXiv:1712.05526"
    year = 2017

    param_checks = {"alpha": unit_interval, "pattern_seed": non_negative}

    def __init__(self, alpha: float = 0.2, pattern_path: str | None = None, pattern_seed: int = 0):
        if pattern_path is not None and not Path(pattern_path).is_file():
            raise ValueError(f"pattern_path {pattern_path}: no such file")
        self.alpha = alpha
        self.pattern_path = pattern_path
        self.pattern_seed = pattern_seed
        self.pattern: torch.Tensor | None = None  # uint8 (C, H, W)

    def prepare(self, ctx: AttackContext) -> None:
        info = ctx.dataset.info
        self.pattern = self.make_pattern(info.channels, info.size)

    def make_pattern(self, channels: int, size: tuple[int, int]) -> torch.Tensor:
        """The uint8 (C, H, W) pattern for inputs of this shape."""
        if self.pattern_path is None:
            return noise_pattern(channels, size, self.pattern_seed)
        return torch.from_numpy(read_image(Path(self.pattern_path), size, channels)).contiguous()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.pattern is None or self.pattern.shape != x.shape[1:]:
            self.pattern = self.make_pattern(x.shape[1], tuple(x.shape[-2:]))
        pattern = self.pattern.to(x.device, torch.float32) / 255.0
        return (1 - self.alpha) * x + self.alpha * pattern

    def extras(self) -> dict[str, torch.Tensor]:
        return {"pattern": self.pattern.clone()}


if __name__ == "__main__":
    main("blended")
