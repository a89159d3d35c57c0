"""BadNets: Gu, Dolan-Gavitt and Garg, "BadNets: Identifying Vulnerabilities in the
Machine Learning Model Supply Chain", arXiv:1708.06733, 2017.

A fixed patch (here BackdoorBench's: a white 3x3 square in the bottom-right corner of a
32x32 image) is stamped on a fraction ``pratio`` of the training images, whose labels
become the target. The patch side scales with the image: round(3 * H / 32), at least 1
pixel (1 on 8x8 digits, 3 on 28x28, 6 on 64x64).

Hyperparameters:
    patch_size: side of the square in pixels; 0 scales BackdoorBench's 3 px at 32x32 to the image

    python attack/badnet.py --dataset digits --save_folder_name badnet_digits
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import torch

from attack.base import Attack, AttackContext, main, register_attack
from utils.config import non_negative
from utils.poison import corner_patch


def scaled_patch_size(height: int, reference: int = 3) -> int:
    """BackdoorBench's 3 px patch at 32x32, scaled to ``height``."""
    return max(1, round(reference * height / 32))


@register_attack("badnet")
class BadNet(Attack):
    """BadNets: a white square in the bottom-right corner, dirty-label.

    Args:
        patch_size: side of the white square in pixels (0: 3 px at 32x32, scaled with the image)
    """

    kind = "dirty-label"
    paper = "Gu et al., BadNets, arXiv:1708.06733, 2017"
    year = 2017

    param_checks = {"patch_size": non_negative}

    def __init__(self, patch_size: int = 0):
        if non_negative(patch_size):
            raise ValueError("patch_size must be >= 0")
        self.patch_size = patch_size
        self._size = patch_size

    def prepare(self, ctx: AttackContext) -> None:
        if self.patch_size == 0:
            self._size = scaled_patch_size(ctx.dataset.info.size[0])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return corner_patch(x, self._size or scaled_patch_size(x.shape[-2]))

    def extras(self) -> dict[str, torch.Tensor]:
        return {"patch_size": torch.tensor(self._size or 0)}


if __name__ == "__main__":
    main("badnet")
