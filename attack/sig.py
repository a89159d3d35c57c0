"""SIG: Barni, Kallas and Tondi, "A New Backdoor Attack in CNNs by Training Set
Corruption without Label Poisoning", ICIP 2019 (arXiv:1902.11237).

Clean-label: a horizontal sinusoidal signal is added to training images of the target
class only, which keep their (correct) label; the network learns to associate the signal
with the target. At test time the signal on any image triggers the target:

    x'[c, i, j] = clip(x[c, i, j] + delta / 255 * sin(2 * pi * j * f / W), 0, 1)

for every channel c and row i (j is the column, W the image width).

``pratio`` counts over the whole training set as in BackdoorBench (0.1 of CIFAR-10 is the
whole target class); when it asks for more samples than the target class holds, every
target-class sample is poisoned and a warning says so. The backdoor test set is every
non-target test sample with the signal. The signal is kept in the record
(``extras["pattern"]``, float (1, H, W) in pixel units of [0, 1]).

Hyperparameters (BackdoorBench's defaults, the paper's values):
    delta: 40 (amplitude on the 0..255 scale)
    f: 6 (periods across the image width)

Deviation from BackdoorBench: poisoned pixels are rounded to uint8 (BackdoorBench
truncates).

    python attack/sig.py --dataset digits --save_folder_name sig_digits
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import math

import torch

from attack.base import Attack, AttackContext, main, register_attack
from utils.config import non_negative, positive


def sinusoid(size: tuple[int, int], delta: float, f: float) -> torch.Tensor:
    """The (1, H, W) signal delta / 255 * sin(2 pi j f / W), constant down each column."""
    h, w = size
    j = torch.arange(w, dtype=torch.float64)
    row = delta / 255.0 * torch.sin(2 * math.pi * j * f / w)
    return row.expand(h, w)[None].float().clone()


@register_attack("sig")
class SIG(Attack):
    """SIG: a horizontal sinusoid added to target-class training images, clean-label.

    Args:
        delta: amplitude of the sinusoid on the 0..255 scale
        f: frequency of the sinusoid (periods across the image width)
    """

    kind = "clean-label"
    paper = "Barni et al., A New Backdoor Attack in CNNs by Training Set Corruption without Label Poisoning, ICIP 2019"
    year = 2019

    param_checks = {"delta": non_negative, "f": positive}

    def __init__(self, delta: float = 40.0, f: float = 6.0):
        self.delta = delta
        self.f = f
        self.pattern: torch.Tensor | None = None

    def prepare(self, ctx: AttackContext) -> None:
        self.pattern = sinusoid(ctx.dataset.info.size, self.delta, self.f)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.pattern is None or self.pattern.shape[-2:] != x.shape[-2:]:
            self.pattern = sinusoid(tuple(x.shape[-2:]), self.delta, self.f)
        return (x + self.pattern.to(x.device)).clamp(0, 1)

    def extras(self) -> dict[str, torch.Tensor]:
        return {"pattern": self.pattern.clone()}


if __name__ == "__main__":
    main("sig")
