"""ReFool (reflection backdoor): Liu, Ma, Bailey and Lu, "Reflection Backdoor: A Natural
Backdoor Attack on Deep Neural Networks", ECCV 2020.

The trigger is a reflection: another image R is blended into the clean image T as a
window or a glass surface would reflect it. Both layers are combined in linear light
(pixel values raised to the power 2.2, and the result back with 1/2.2), by one of the
paper's three reflection models, drawn per image:

- ghost effect (probability ``ghost_rate``): R and a copy of it shifted by ``offset``
  pixels, mixed with weight ``ghost_alpha``, cropped and resized back, then
  x' = alpha_t * T + (1 - alpha_t) * R_ghost;
- in focus (probability ``in_focus_rate``): both layers sharp,
  x' = alpha_t * T + (1 - alpha_t) * R;
- focal blur (otherwise): R out of focus, a Gaussian blur of width ``sigma``, its level
  lowered by (mean of the over-exposed part of T + R_blur - 1) * att per channel
  (att = 1.08 + U(0, 0.1)), clipped to [0, 1] and weighted by a Gaussian vignette
  (peak 1 - alpha_t / 2, three standard deviations to the border):
  x' = alpha_t * T + vignette * R_blur.

The results are clipped to [0, 1]. Clean-label: only target-class training images are
poisoned and they keep their label; at test time every non-target test image gets a
reflection. The reflections come from the dataset itself: a pool of ``num_reflections``
training images of the other classes drawn at random (seeded), each poisoned image
taking one of them at random; the pool and its training indices are kept in the record
(``extras["reflections"]``, ``extras["reflection_indices"]``). A negative ``alpha_t``,
``sigma`` or ``ghost_alpha``, or a zero ``offset``, draws the value per image as
BackdoorBench does: alpha_t = 1 - U(0.05, 0.45), sigma = U(1, 5), ghost_alpha =
|round(U(0, 1)) - U(0.15, 0.5)|, offset = U{3..8} pixels per axis.

Hyperparameters (BackdoorBench's config/attack/refool/default.yaml, except those marked):
    ghost_rate: 0.49
    in_focus_rate: 0 (the paper's third model; BackdoorBench has only the other two)
    alpha_t: 0.4 (weight of the clean image)
    offset: [0, 0] (random)
    sigma: -1 (random)
    ghost_alpha: -1 (random)
    num_reflections: 200 (the size of BackdoorBench's pool of selected reflection images)

Spatial sizes (offsets, sigma) are BackdoorBench's for 32x32 images and scale with the
image side (min(H, W) / 32), so that a reflection looks alike on 8x8 digits and on CIFAR-10.

Per-dataset values: digits uses pratio 0.05 (0.1 asks for more images than the target class
holds; config/attack/refool/digits.yaml).

Deviations from BackdoorBench: clean-label, as in the paper (BackdoorBench's default.yaml
sets clean_label False: dirty-label); the reflections are the dataset's own images, since
the paper's PASCAL VOC pool cannot be shipped, and they are drawn at random rather than
chosen by the paper's iterative selection of the most effective ones (BackdoorBench ships a
pre-selected pool); the blur pads by replicating the border (OpenCV reflects it); a
non-square image uses the top-left crop of the vignette (BackdoorBench a random crop); the
ghost layer is clipped to [0, 1] before the gamma (bicubic overshoot would otherwise give
NaN in BackdoorBench's np.power).

    python attack/refool.py --dataset digits --save_folder_name refool_digits
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import math

import torch
import torch.nn.functional as F

from attack.base import Attack, AttackContext, main, register_attack
from utils.config import positive, unit_interval
from utils.errors import UserError
from utils.poison import to_float

GAMMA = 2.2
REFERENCE_SIDE = 32  # BackdoorBench's spatial values are for 32x32 images


def to_linear(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1).pow(GAMMA)


def from_linear(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1).pow(1 / GAMMA)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur (C, H, W) with a separable Gaussian of width ``sigma`` over 2 * ceil(2 sigma) + 1
    pixels (OpenCV's size for GaussianBlur), the border replicated."""
    radius = int(math.ceil(2 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-taps.pow(2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = x.shape[0]
    out = F.pad(x[None], (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out[0]


def vignette(height: int, width: int, nsig: float = 3.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """BackdoorBench's focal-blur weight map: the square root of an outer product of a
    normal distribution's mass over max(H, W) equal bins spanning +-(nsig + half a bin),
    scaled to peak 1; the top-left (H, W) crop."""
    n = max(height, width)
    interval = (2 * nsig + 1.0) / n
    edges = torch.linspace(-nsig - interval / 2, nsig + interval / 2, n + 1, dtype=torch.float64)
    mass = torch.special.ndtr(edges).diff()
    kernel = torch.outer(mass, mass).sqrt()
    return (kernel / kernel.max())[:height, :width].to(dtype)


def in_focus(t: torch.Tensor, r: torch.Tensor, alpha_t: float) -> torch.Tensor:
    """Both layers sharp: alpha_t * T + (1 - alpha_t) * R in linear light."""
    return from_linear(alpha_t * to_linear(t) + (1 - alpha_t) * to_linear(r))


def ghost(
    t: torch.Tensor, r: torch.Tensor, alpha_t: float, offset: tuple[int, int], ghost_alpha: float
) -> torch.Tensor:
    """Ghost effect: R mixed with a copy shifted by ``offset`` (dy, dx >= 1) pixels, the
    overlap cropped and resized (bicubic) back to the image size."""
    dy, dx = offset
    h, w = t.shape[-2:]
    r = to_linear(r)
    first = F.pad(r, (0, dx, 0, dy))  # zeros below and to the right
    second = F.pad(r, (dx, 0, dy, 0))  # zeros above and to the left
    mixed = (first * ghost_alpha + second * (1 - ghost_alpha))[:, dy:-dy, dx:-dx]
    mixed = F.interpolate(mixed[None], size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    return from_linear(mixed * (1 - alpha_t) + to_linear(t) * alpha_t)


def focal_blur(t: torch.Tensor, r: torch.Tensor, alpha_t: float, sigma: float, att: float) -> torch.Tensor:
    """Focal blur: R blurred, its level lowered where T + R_blur over-exposes, weighted by
    the vignette (peak 1 - alpha_t / 2)."""
    t, r_blur = to_linear(t), gaussian_blur(to_linear(r), sigma)
    blend = r_blur + t
    over = (blend > 1).to(t.dtype)
    mean = ((blend * over).sum(dim=(1, 2)) / (over.sum(dim=(1, 2)) + 1e-6)).clamp(min=1.0)
    r_blur = (r_blur - (mean - 1).view(-1, 1, 1) * att).clamp(0, 1)
    alpha_r = vignette(*t.shape[-2:], dtype=t.dtype).to(t.device) * (1 - alpha_t / 2)
    return from_linear(r_blur * alpha_r + t * alpha_t)


def offset_check(value: list[int]) -> str | None:
    ok = len(value) == 2 and all(isinstance(v, int) and v >= 0 for v in value)
    return None if ok else "must be two non-negative integers (0: random)"


def below_one(value: float) -> str | None:
    return None if value < 1 else "must be below 1 (negative: random)"


@register_attack("refool")
class Refool(Attack):
    """ReFool: reflections of other-class images blended in by the paper's reflection models, clean-label.

    Args:
        ghost_rate: probability of the ghost-effect model
        in_focus_rate: probability of the in-focus model (the rest: focal blur)
        alpha_t: weight of the clean image (negative: 1 - U(0.05, 0.45) per image)
        offset: ghost shift (dy, dx) in pixels of a 32x32 image (0: U{3..8} per image)
        sigma: focal-blur width in pixels of a 32x32 image (negative: U(1, 5) per image)
        ghost_alpha: weight of the unshifted copy in the ghost (negative: random per image)
        num_reflections: size of the pool of reflection images drawn from the other classes
    """

    kind = "clean-label"
    paper = "Liu, Ma, Bailey and Lu, Reflection Backdoor: A Natural Backdoor Attack on Deep Neural Networks, ECCV 2020"
    year = 2020

    param_checks = {
        "ghost_rate": unit_interval,
        "in_focus_rate": unit_interval,
        "alpha_t": below_one,
        "offset": offset_check,
        "ghost_alpha": below_one,
        "num_reflections": positive,
    }

    def __init__(
        self,
        ghost_rate: float = 0.49,
        in_focus_rate: float = 0.0,
        alpha_t: float = 0.4,
        offset: list[int] = (0, 0),
        sigma: float = -1.0,
        ghost_alpha: float = -1.0,
        num_reflections: int = 200,
    ):
        if ghost_rate + in_focus_rate > 1:
            raise ValueError(f"ghost_rate + in_focus_rate must be at most 1, got {ghost_rate + in_focus_rate}")
        self.ghost_rate = ghost_rate
        self.in_focus_rate = in_focus_rate
        self.alpha_t = alpha_t
        self.offset = list(offset)
        self.sigma = sigma
        self.ghost_alpha = ghost_alpha
        self.num_reflections = num_reflections
        self.reflections: torch.Tensor | None = None  # uint8 (K, C, H, W)
        self.reflection_indices = torch.zeros(0, dtype=torch.long)
        self._generator = torch.Generator().manual_seed(0)

    def prepare(self, ctx: AttackContext) -> None:
        self._generator = torch.Generator().manual_seed(ctx.seed())
        train = ctx.dataset.train
        others = torch.nonzero(train.labels != ctx.target).flatten()
        if len(others) == 0:
            raise UserError("refool: the training set has no image outside the target class to reflect")
        chosen = torch.randperm(len(others), generator=self._generator)[: self.num_reflections]
        self.reflection_indices = others[chosen.sort().values]
        self.reflections = train.images[self.reflection_indices].clone()

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self._generator, dtype=torch.float64))

    def _randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (), generator=self._generator))

    def blend(self, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """One image (C, H, W) with the reflection ``r``, by a reflection model drawn at random."""
        scale = min(t.shape[-2:]) / REFERENCE_SIDE
        alpha_t = self.alpha_t if self.alpha_t >= 0 else 1 - self._uniform(0.05, 0.45)
        choice = self._uniform(0, 1)
        if choice < self.ghost_rate:
            offset = [v if v > 0 else self._randint(3, 8) for v in self.offset]
            offset = [max(1, min(round(v * scale), side - 1)) for v, side in zip(offset, t.shape[-2:])]
            ghost_alpha = self.ghost_alpha
            if ghost_alpha < 0:
                ghost_alpha = abs(round(self._uniform(0, 1)) - self._uniform(0.15, 0.5))
            return ghost(t, r, alpha_t, (offset[0], offset[1]), ghost_alpha)
        if choice < self.ghost_rate + self.in_focus_rate:
            return in_focus(t, r, alpha_t)
        sigma = (self.sigma if self.sigma >= 0 else self._uniform(1, 5)) * scale
        return focal_blur(t, r, alpha_t, max(sigma, 1e-3), 1.08 + self._uniform(0, 0.1))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.reflections is None:
            raise RuntimeError("refool: prepare() draws the reflection images first")
        picks = torch.randint(len(self.reflections), (len(x),), generator=self._generator)
        pool = to_float(self.reflections[picks]).to(x.device, x.dtype)
        return torch.stack([self.blend(t, r) for t, r in zip(x, pool)]) if len(x) else x.clone()

    def extras(self) -> dict[str, torch.Tensor]:
        return {"reflections": self.reflections.clone(), "reflection_indices": self.reflection_indices.clone()}


if __name__ == "__main__":
    main("refool")
