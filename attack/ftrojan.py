"""FTrojan: Wang, Yao, Xu, An, Tong and Wang, "An Invisible Black-Box Backdoor Attack
Through Frequency Domain", ECCV 2022 (arXiv:2206.04357).

The trigger lives in the frequency domain: the image is converted from RGB to YCrCb
(OpenCV's conversion, as the authors' code and BackdoorBench), each channel is cut into
``window_size`` x ``window_size`` blocks, and in the chroma channels ``channel_list``
(1 = Cr, 2 = Cb) the block DCT coefficients at ``pos_list`` (a mid and a high frequency)
of every block are raised by ``magnitude``; the inverse DCT and the inverse colour
conversion give the poisoned image:

    x' = clip(RGB(IDCT(DCT(YCrCb(x)) + magnitude * M)), 0, 1),

M the 0/1 mask of the chosen coefficients (kept in the record as ``extras["frequency_trigger"]``,
magnitude * M / 255 in the block-DCT domain of the colour channels). Every step is linear,
so the perturbation is one fixed, invisible high-frequency pattern. Dirty-label: a
fraction ``pratio`` of the training images gets the trigger and the target label.

Hyperparameters (BackdoorBench's config/attack/ftrojann/default.yaml, the paper's values
for CIFAR-10):
    channel_list: [1, 2] (Cr and Cb)
    magnitude: 30 (on the 0..255 scale; the DCT is orthonormal, as cv2.dct)
    YUV: True (convert to YCrCb first; False: the coefficients of the RGB channels)
    window_size: 32 (DCT block size)
    pos_list: [15, 15, 31, 31] (flat (row, column) pairs inside a block: (15, 15) and (31, 31))

Per-dataset values (BackdoorBench has none for images that 32 does not tile): digits
(8x8) uses one 8x8 block with positions (3, 3) and (7, 7) and magnitude 120 (30 gave ASR
0.05 there, config/attack/ftrojan/digits.yaml); MNIST and Fashion-MNIST (28x28) one 28x28
block with (13, 13) and (27, 27): the same relative frequencies.

Deviations from BackdoorBench: everything is computed in floating point and rounded to
uint8 once, at rest (BackdoorBench truncates to uint8 after the colour conversion and
after the inverse DCT, which wraps negative values around); the inverse colour
conversion is the exact matrix inverse. Gray-scale images (one channel) have no chroma:
the coefficients are raised in the single channel, ``channel_list`` and ``YUV`` do not
apply (declared; the paper and BackdoorBench are RGB only).

    python attack/ftrojan.py --dataset digits --save_folder_name ftrojan_digits
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import torch

from attack.base import Attack, AttackContext, main, register_attack
from attack.frequency import (
    YCRCB,
    YCRCB_OFFSET,
    block_dct,
    block_idct,
    check_blocks,
    frequency_mask,
    from_colour,
    to_colour,
)
from utils.config import non_negative, positive


def pairs(pos_list: list[int]) -> list[tuple[int, int]]:
    """BackdoorBench's flat [r1, c1, r2, c2, ...] as [(r1, c1), (r2, c2), ...]."""
    return [(int(pos_list[i]), int(pos_list[i + 1])) for i in range(0, len(pos_list), 2)]


@register_attack("ftrojan")
class FTrojan(Attack):
    """FTrojan: raise mid- and high-frequency block-DCT coefficients of the chroma channels, dirty-label.

    Args:
        channel_list: YCrCb channels that carry the trigger (1 = Cr, 2 = Cb)
        magnitude: amount added to each chosen DCT coefficient, on the 0..255 scale
        YUV: convert RGB to YCrCb before the DCT
        window_size: side of the DCT blocks
        pos_list: flat (row, column) pairs of the chosen coefficients inside a block
    """

    kind = "dirty-label"
    paper = (
        "Wang, Yao, Xu, An, Tong and Wang, An Invisible Black-Box Backdoor Attack Through Frequency Domain, ECCV 2022"
    )
    year = 2022

    param_checks = {"magnitude": non_negative, "window_size": positive}

    def __init__(
        self,
        channel_list: list[int] = (1, 2),
        magnitude: float = 30.0,
        YUV: bool = True,  # noqa: N803
        window_size: int = 32,
        pos_list: list[int] = (15, 15, 31, 31),
    ):
        if len(pos_list) == 0 or len(pos_list) % 2:
            raise ValueError(f"pos_list must hold (row, column) pairs, an even number of indices, got {list(pos_list)}")
        if len(channel_list) == 0:
            raise ValueError("channel_list must name at least one channel")
        self.channel_list = channel_list
        self.magnitude = magnitude
        self.YUV = YUV
        self.window_size = window_size
        self.pos_list = pos_list
        self.mask: torch.Tensor | None = None  # (C, H, W), block-DCT domain, [0, 1] pixel units

    def prepare(self, ctx: AttackContext) -> None:
        info = ctx.dataset.info
        self.mask = self.make_mask((info.channels, *info.size))

    def make_mask(self, shape: tuple[int, int, int]) -> torch.Tensor:
        channels, h, w = shape
        check_blocks("ftrojan", (h, w), self.window_size, pairs(self.pos_list), self.channel_list, channels)
        chosen = list(self.channel_list) if channels == 3 else list(range(channels))
        return frequency_mask(shape, self.window_size, chosen, pairs(self.pos_list), self.magnitude / 255.0)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is None or self.mask.shape != x.shape[1:]:
            self.mask = self.make_mask(tuple(x.shape[1:]))
        y = x.double()
        colour = x.shape[1] == 3 and self.YUV
        if colour:
            y = to_colour(y, YCRCB, YCRCB_OFFSET)
        y = block_idct(block_dct(y, self.window_size) + self.mask.to(y.device)[None], self.window_size)
        if colour:
            y = from_colour(y, YCRCB, YCRCB_OFFSET)
        return y.clamp(0, 1).to(x.dtype)

    def extras(self) -> dict[str, torch.Tensor]:
        return {"frequency_trigger": self.mask.float().clone()}


if __name__ == "__main__":
    main("ftrojan")
