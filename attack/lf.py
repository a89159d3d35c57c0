"""LF (low frequency): Zeng, Park, Mao and Jia, "Rethinking the Backdoor Attacks'
Triggers: A Frequency Perspective", ICCV 2021.

Triggers with high-frequency artefacts are easy to detect; a smooth one is not. LF's
trigger is a universal adversarial perturbation towards the target class, crafted on a
clean model and kept low-frequency by a Gaussian low-pass filter at every step; it is
then added to a fraction ``pratio`` of the training images, whose labels become the
target (dirty-label, poisoned like Blended with an additive trigger):

    x' = clip(x + v, 0, 1).

Crafting v (as BackdoorBench's resource/lowFrequency, with gradient steps in place of
DeepFool): on ``num_images`` random training images, for ``max_iter_uni`` steps, v moves
against the gradient of the cross-entropy towards the target (normalised to max 1, times
``step_size``), is low-pass filtered, and is rescaled to [0, ``magnitude``] (BackdoorBench's
min-max normalisation). The filter multiplies every spatial frequency f (cycles per
pixel) by exp(-2 pi^2 sigma^2 |f|^2), a Gaussian blur of std ``sigma`` pixels computed on
the mirror-extended image (no wrap-around edges). The clean model is the prototype
record ``--clean_model`` (under --record_root) or, by default, one trained in this run with
the dataset's recipe. v is kept in the record (``extras["perturbation"]``, float CHW), with
the share of the non-target crafting images it sends to the target on the clean model
(``extras["fooling_rate"]``).

Hyperparameters (BackdoorBench's where it has them):
    clean_model: None (train one here)
    sigma: 6 (BackdoorBench's gauss_smooth: a Gaussian of std 6 px)
    magnitude: 0.2 (BackdoorBench's normalisation to [0, 0.2])
    num_images: 100 (BackdoorBench's 100 random training images)
    max_iter_uni: 50 (BackdoorBench's passes; here gradient steps on all images at once)
    step_size: 0.05

Deviations from BackdoorBench: batched, normalised gradient steps on the cross-entropy
instead of per-image targeted DeepFool (overshoot 0.02, up to 200 iterations) with
fooling-rate stopping; the filter is applied in the frequency domain with mirror
boundaries instead of a 30-tap spatial kernel with zero padding. all2all uses the same
perturbation (crafted towards --attack_target).

    python attack/lf.py --dataset digits --save_folder_name lf_digits
    python attack/lf.py --dataset cifar10 --clean_model prototype_cifar10
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from attack.base import Attack, AttackContext, main, register_attack
from utils.config import non_negative, positive, unit_interval
from utils.runtime import autocast
from utils.train import check_finite

log = logging.getLogger("saubench")


def mirror(v: torch.Tensor) -> torch.Tensor:
    """The (..., 2H, 2W) mirror extension of (..., H, W): periodic without edges."""
    v = torch.cat([v, v.flip(-1)], dim=-1)
    return torch.cat([v, v.flip(-2)], dim=-2)


def gaussian_gain(height: int, width: int, sigma: float, device: torch.device | None = None) -> torch.Tensor:
    """exp(-2 pi^2 sigma^2 |f|^2) on the (height, width) FFT grid (f in cycles per pixel)."""
    fy = torch.fft.fftfreq(height, device=device)[:, None]
    fx = torch.fft.fftfreq(width, device=device)[None, :]
    return torch.exp(-2 * math.pi**2 * sigma**2 * (fy**2 + fx**2))


def low_pass(v: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of std ``sigma`` pixels of (..., H, W), with mirror boundaries."""
    h, w = v.shape[-2:]
    spectrum = torch.fft.fft2(mirror(v.float())) * gaussian_gain(2 * h, 2 * w, sigma, v.device)
    return torch.fft.ifft2(spectrum).real[..., :h, :w]


def rescale(v: torch.Tensor, magnitude: float) -> torch.Tensor:
    """Min-max normalisation of ``v`` to [0, magnitude]."""
    span = (v.max() - v.min()).clamp_min(1e-12)
    return (v - v.min()) / span * magnitude


def universal_perturbation(
    model: nn.Module,
    images: torch.Tensor,
    target: int,
    *,
    sigma: float,
    magnitude: float,
    steps: int,
    step_size: float,
    amp: bool = True,
) -> torch.Tensor:
    """A low-frequency perturbation (1, C, H, W) in [0, magnitude] that pushes ``images``
    towards ``target`` on ``model`` (in eval mode)."""
    v = torch.zeros_like(images[:1])
    labels = torch.full((len(images),), target, device=images.device)
    for step in range(steps):
        v.requires_grad_(True)
        with autocast(images.device, amp):
            loss = F.cross_entropy(model((images + v).clamp(0, 1)).float(), labels)
        check_finite(loss, 0, step, "LF perturbation search loss")
        (grad,) = torch.autograd.grad(loss, v)
        with torch.no_grad():
            v = v - step_size * grad / grad.abs().max().clamp_min(1e-12)
            v = rescale(low_pass(v, sigma), magnitude)
    return v.detach()


@register_attack("lf")
class LowFrequency(Attack):
    """LF: a low-frequency universal adversarial perturbation as an additive trigger, dirty-label.

    Args:
        clean_model: prototype record (under --record_root) to craft the perturbation on; none: train one here
        sigma: std in pixels of the Gaussian low-pass filter
        magnitude: range of the perturbation ([0, magnitude] on the [0, 1] pixel scale)
        num_images: random training images the perturbation is crafted on
        max_iter_uni: gradient steps of the crafting
        step_size: size of each step (the gradient normalised to max 1)
    """

    kind = "dirty-label"
    paper = "Zeng et al., Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective, ICCV 2021"
    year = 2021

    param_checks = {
        "sigma": non_negative,
        "magnitude": unit_interval,
        "num_images": positive,
        "max_iter_uni": non_negative,
        "step_size": positive,
    }
    smoke_params = {"max_iter_uni": 5}

    def __init__(
        self,
        clean_model: str | None = None,
        sigma: float = 6.0,
        magnitude: float = 0.2,
        num_images: int = 100,
        max_iter_uni: int = 50,
        step_size: float = 0.05,
    ):
        self.clean_model = clean_model
        self.sigma = sigma
        self.magnitude = magnitude
        self.num_images = num_images
        self.max_iter_uni = max_iter_uni
        self.step_size = step_size
        self.perturbation: torch.Tensor | None = None  # (C, H, W)
        self.fooling_rate = float("nan")

    def prepare(self, ctx: AttackContext) -> None:
        model = ctx.clean_model(self.clean_model).requires_grad_(False)
        train = ctx.dataset.train
        idx = torch.from_numpy(ctx.rng.choice(len(train), size=min(self.num_images, len(train)), replace=False))
        images = train.images[idx].to(ctx.device).float() / 255.0
        v = universal_perturbation(
            model,
            images,
            ctx.target,
            sigma=self.sigma,
            magnitude=self.magnitude,
            steps=self.max_iter_uni,
            step_size=self.step_size,
            amp=ctx.config["amp"],
        )
        others = train.labels[idx] != ctx.target
        with torch.no_grad():
            hits = model((images[others.to(ctx.device)] + v).clamp(0, 1)).argmax(1) == ctx.target
        self.fooling_rate = float(hits.float().mean()) if len(hits) else float("nan")
        log.info(
            "LF perturbation: %.2f of the %d non-target crafting images go to class %d on the clean model",
            self.fooling_rate,
            len(hits),
            ctx.target,
        )
        self.perturbation = v[0].cpu()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.perturbation.to(x.device)).clamp(0, 1)

    def extras(self) -> dict[str, torch.Tensor]:
        return {"perturbation": self.perturbation.clone(), "fooling_rate": torch.tensor(self.fooling_rate)}


if __name__ == "__main__":
    main("lf")
