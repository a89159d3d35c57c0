"""WaNet: Nguyen and Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR
2021.

The trigger is a fixed, smooth warping of the image. A random field of k x k control
points in [-1, 1] (scaled to mean absolute value 1) is upsampled bicubically to the
image size (``noise_grid``, H x W x 2); the sampling grid is

    grid = clamp((identity + s * noise_grid / H) * grid_rescale, -1, 1)

and the poisoned image is ``grid_sample(x, grid)`` (bilinear, align_corners=True).

Training-controlled: the attacker controls the training loop. In every (shuffled,
augmented) batch of size B, int(pratio * B) samples are warped and get the attacker's
label (one sample with probability pratio * B when that is below one), and
int(cross_ratio * that number) further samples are "noise mode" samples: warped with the
grid plus a fresh uniform perturbation in [-1, 1] / H per pixel, keeping their true
label, so that the network learns the exact warp rather than any warp. The backdoor test
set is the non-target test samples warped with the fixed grid; the cross test set (the
record's ``cross_test``) is every test sample in noise mode with its true label. The
record keeps ``extras["noise_grid"]`` and ``extras["grid"]`` (1 x H x W x 2), from which
the backdoor images are reproduced exactly.

Hyperparameters (BackdoorBench's config/attack/wanet/default.yaml):
    k: 4 (control points per side)
    s: 0.5 (warping strength)
    grid_rescale: 1
    cross_ratio: 2 (noise-mode samples per backdoor sample)

Deviations from BackdoorBench: the dataset's train transform (random crop with the
dataset's padding, flip where it declares one) is applied before the warp and stands in for
WaNet's post-poisoning augmentation (crop with 5 px padding, p 0.8; rotation of 10
degrees, p 0.5); the learning-rate schedule is the dataset's recipe (BackdoorBench's
MultiStepLR at epoch 100 is a constant rate over its 100 epochs). No poisoned training
set is kept at rest (``bd_train`` is None): every batch is poisoned afresh.

    python attack/wanet.py --dataset digits --save_folder_name wanet_digits
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import torch
import torch.nn.functional as F

from attack.base import Attack, AttackContext, main, register_attack
from utils.config import non_negative, positive
from utils.train import BatchHook


def identity_grid(height: int, width: int) -> torch.Tensor:
    """The (1, H, W, 2) grid that grid_sample maps to the image itself (x first)."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return torch.stack((xs, ys), dim=-1)[None]


def random_field(k: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """WaNet's noise grid: k x k uniform control points in [-1, 1], scaled to mean
    absolute value 1, upsampled bicubically to (1, H, W, 2)."""
    points = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
    points = points / points.abs().mean()
    return F.interpolate(points, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)


def warping_grid(noise_grid: torch.Tensor, s: float, grid_rescale: float = 1.0) -> torch.Tensor:
    """The backdoor sampling grid for a noise grid of shape (1, H, W, 2)."""
    height, width = noise_grid.shape[1:3]
    grid = (identity_grid(height, width).to(noise_grid) + s * noise_grid / height) * grid_rescale
    return grid.clamp(-1, 1)


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Sample every image of ``x`` (N, C, H, W) at ``grid`` (1 or N, H, W, 2)."""
    grid = grid.to(x.device, x.dtype).expand(len(x), -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


@register_attack("wanet")
class WaNet(Attack):
    """WaNet: a fixed smooth warp of the image, training-controlled with noise mode.

    Args:
        k: control points per side of the random warping field
        s: strength of the warp
        grid_rescale: scale of the whole sampling grid
        cross_ratio: noise-mode samples per backdoor sample in each batch
    """

    kind = "training-controlled"
    paper = "Nguyen and Tran, WaNet - Imperceptible Warping-based Backdoor Attack, ICLR 2021"
    year = 2021

    param_checks = {"k": positive, "s": non_negative, "grid_rescale": positive, "cross_ratio": non_negative}

    def __init__(self, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0, cross_ratio: float = 2.0):
        self.k = k
        self.s = s
        self.grid_rescale = grid_rescale
        self.cross_ratio = cross_ratio
        self.noise_grid: torch.Tensor | None = None
        self.grid: torch.Tensor | None = None
        self._generator = torch.Generator().manual_seed(0)

    def prepare(self, ctx: AttackContext) -> None:
        self._generator = torch.Generator().manual_seed(ctx.seed())
        self.noise_grid = random_field(self.k, *ctx.dataset.info.size, self._generator)
        self.grid = warping_grid(self.noise_grid, self.s, self.grid_rescale)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return warp(x, self.grid)

    def cross(self, x: torch.Tensor) -> torch.Tensor:
        """Noise mode: the grid plus a fresh uniform perturbation in [-1, 1] / H per pixel."""
        height = x.shape[-2]
        noise = torch.rand(len(x), *self.grid.shape[1:], generator=self._generator) * 2 - 1
        return warp(x, (self.grid + noise / height).clamp(-1, 1))

    def batch_hook(self, ctx: AttackContext) -> BatchHook:
        policy = ctx.policy  # the run's pratio, target and label transform

        def hook(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            n_bd = policy.count(len(x), self._generator)
            n_cross = min(int(n_bd * self.cross_ratio), len(x) - n_bd)
            bd = self.apply(x[:n_bd])
            noisy = self.cross(x[n_bd : n_bd + n_cross])
            y_bd = policy.relabel(y[:n_bd])
            return torch.cat([bd, noisy, x[n_bd + n_cross :]]), torch.cat([y_bd, y[n_bd:]])

        return hook

    def extras(self) -> dict[str, torch.Tensor]:
        return {"noise_grid": self.noise_grid.clone(), "grid": self.grid.clone()}


if __name__ == "__main__":
    main("wanet")
