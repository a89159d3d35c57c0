"""CTRL: Li, Pang, Xi, Du, Ji, Yao and Wang, "An Embarrassingly Simple Backdoor Attack on
Self-supervised Learning", ICCV 2023 (arXiv:2210.07346), as BackdoorBench adapts it to
supervised training.

The trigger is a fixed perturbation of the image's spectrum: the image (on the 0..255
scale) is converted to YUV (kornia's conversion, as the authors' code), the 2-D DCT of
the whole image is taken in the chrominance channels ``trigger_channels`` (1 = U, 2 = V),
the coefficients at the diagonal positions ``pos_list`` ((15, 15) and (31, 31) of a 32x32
image: a mid and the highest frequency) are raised by ``magnitude``, and the inverse DCT
and inverse colour conversion give the poisoned image:

    x' = clip(RGB(IDCT(DCT(YUV(x)) + magnitude * M)), 0, 1).

The luminance Y is untouched (the inverse conversion is exact), so the trigger is a faint
colour pattern. BackdoorBench trains with it as a clean-label attack: ``pratio`` of the
whole training set, drawn from the target class, get the trigger and keep their label;
the backdoor test set is every non-target test image with the trigger. The block-DCT-domain
trigger (magnitude * M / 255) is kept in the record (``extras["frequency_trigger"]``).

Hyperparameters (BackdoorBench's config/attack/ctrl/default.yaml and
utils/bd_img_transform/ctrl.py):
    magnitude: 100 (on the 0..255 scale; orthonormal DCT; BackdoorBench hard-codes it)
    use_yuv: True (convert RGB to YUV first; False: the RGB channels themselves)
    trigger_channels: [1, 2] (U and V)
    pos_list: [15, 31] (diagonal positions (15, 15) and (31, 31))
    pratio (harness): 0.05, clean-label

Per-dataset values: digits (8x8) uses positions (3, 3) and (7, 7) and magnitude 600 (100
gave ASR 0.00 there, config/attack/ctrl/digits.yaml), MNIST and Fashion-MNIST (28x28)
(13, 13) and (27, 27): BackdoorBench's positions scaled to the image side (its (31, 31)
lies outside smaller images).

Deviations from BackdoorBench: the DCT window is the whole image as in BackdoorBench, but
for non-square images it must tile the width (a clear error otherwise); computed in
floating point and rounded to uint8 once at rest (BackdoorBench truncates, and wraps
negative values); the inverse YUV conversion is the exact matrix inverse (kornia's is
rounded to three decimals). Gray-scale images have no chrominance: the coefficients are
raised in the single channel, and ``use_yuv`` and ``trigger_channels`` do not apply
(declared; the paper and BackdoorBench are RGB only). BackdoorBench's ``use_dct`` (a
matrix implementation of the same DCT) is not a hyperparameter here.

    python attack/ctrl.py --dataset digits --save_folder_name ctrl_digits
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import torch

from attack.base import Attack, AttackContext, main, register_attack
from attack.frequency import NO_OFFSET, YUV, block_dct, block_idct, check_blocks, frequency_mask, from_colour, to_colour
from utils.config import non_negative


@register_attack("ctrl")
class CTRL(Attack):
    """CTRL: raise mid- and high-frequency DCT coefficients of the chrominance (U, V), clean-label.

    Args:
        magnitude: amount added to each chosen DCT coefficient, on the 0..255 scale
        use_yuv: convert RGB to YUV before the DCT
        trigger_channels: YUV channels that carry the trigger (1 = U, 2 = V)
        pos_list: diagonal positions (p, p) of the chosen DCT coefficients
    """

    kind = "clean-label"
    paper = (
        "Li, Pang, Xi, Du, Ji, Yao and Wang, An Embarrassingly Simple Backdoor Attack on Self-supervised "
        "Learning, ICCV 2023"
    )
    year = 2023

    param_checks = {"magnitude": non_negative}

    def __init__(
        self,
        magnitude: float = 100.0,
        use_yuv: bool = True,
        trigger_channels: list[int] = (1, 2),
        pos_list: list[int] = (15, 31),
    ):
        if len(pos_list) == 0:
            raise ValueError("pos_list must name at least one position")
        if len(trigger_channels) == 0:
            raise ValueError("trigger_channels must name at least one channel")
        self.magnitude = magnitude
        self.use_yuv = use_yuv
        self.trigger_channels = trigger_channels
        self.pos_list = pos_list
        self.mask: torch.Tensor | None = None  # (C, H, W), DCT domain, [0, 1] pixel units

    def prepare(self, ctx: AttackContext) -> None:
        info = ctx.dataset.info
        self.mask = self.make_mask((info.channels, *info.size))

    def make_mask(self, shape: tuple[int, int, int]) -> torch.Tensor:
        channels, h, w = shape
        positions = [(int(p), int(p)) for p in self.pos_list]
        check_blocks("ctrl", (h, w), h, positions, self.trigger_channels, channels)
        chosen = list(self.trigger_channels) if channels == 3 else list(range(channels))
        return frequency_mask(shape, h, chosen, positions, self.magnitude / 255.0)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is None or self.mask.shape != x.shape[1:]:
            self.mask = self.make_mask(tuple(x.shape[1:]))
        window = x.shape[-2]
        y = x.double()
        colour = x.shape[1] == 3 and self.use_yuv
        if colour:
            y = to_colour(y, YUV, NO_OFFSET)
        y = block_idct(block_dct(y, window) + self.mask.to(y.device)[None], window)
        if colour:
            y = from_colour(y, YUV, NO_OFFSET)
        return y.clamp(0, 1).to(x.dtype)

    def extras(self) -> dict[str, torch.Tensor]:
        return {"frequency_trigger": self.mask.float().clone()}


if __name__ == "__main__":
    main("ctrl")
