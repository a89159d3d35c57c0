"""SentiNet: input detection by transplanting the salient region. Chou, Tramèr and
Pellegrino, "SentiNet: Detecting Localized Universal Attacks Against Deep Learning
Systems", IEEE S&P Workshops (DLS) 2020 (arXiv:1812.00292); BackdoorBench's version
(detection_infer/sentinet.py, config/detection/sentinet/).

Idea: a localized trigger is what the model looks at when it predicts the target class,
and it keeps working wherever it is pasted. For an input x with predicted label y, Grad-CAM
(Selvaraju et al., ICCV 2017) gives the region that drives y: the feature maps A_k of a
late layer weighted by the spatial mean of d logit_y / d A_k, summed, rectified, upsampled
to the input and scaled to [0, 1]; the mask keeps the pixels where it reaches
``mask_threshold``. That region is pasted onto clean images (x * mask + clean * (1 - mask)):
the fraction of them then classified as y (``fooled``) is high for a trigger and low for
a clean object part. It is also pasted onto uniform random noise (an inert pattern): the
model's average confidence there (``avg_conf``) is high for a trigger.

The score of an input (higher = more suspicious) is its fooled fraction; it is flagged,
as BackdoorBench's, when its average confidence on the inert patterns exceeds
``conf_threshold``.

Hyperparameters (BackdoorBench's config/detection/sentinet/cifar10.yaml and sentinet.py):
    n_overlay: clean images each region is pasted onto (100: clean_sample_num)
    mask_threshold: Grad-CAM value from which a pixel belongs to the region (0.85: mask_cond)
    conf_threshold: average confidence on inert patterns above which an input is flagged (0.9)
    layer: the module whose output Grad-CAM reads (None: the architecture's feature layer,
        its last stage; BackdoorBench: layer4.1.conv2 of preactresnet18, its last convolution)
    batch_size: inputs explained at a time (128)

Deviations:
* Grad-CAM is this project's (BackdoorBench calls pytorch_grad_cam's GradCAM, which this
  follows: the predicted class's logit, bilinear upsampling, per-image min-max scaling).
* The clean images are drawn from the defender's clean subset with a generator seeded by
  the run's seed, the same ones for every input (BackdoorBench: clean_sample_num images of
  the clean test set, class-balanced), and the inert patterns are drawn from it too, one
  per clean image.
* The score (the fooled fraction) is this project's way of ranking every input; the paper
  draws a boundary in the (fooled, confidence) plane, BackdoorBench thresholds the
  confidence.
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import logging

import torch
import torch.nn.functional as F
from torch import nn

from defense.base import Defense, DefenseData, Detection, InputDetector, layer_module, main, register_defense
from utils import config as cfg
from utils.models import Classifier

log = logging.getLogger("saubench")


def _unit_interval(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must be in [0, 1]"


def grad_cam(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Grad-CAM of images ``x`` (N, C, H, W) for class ``target`` (default: the predicted
    one) at the output of ``layer``: relu(sum_k alpha_k A_k), alpha_k the spatial mean of
    d logit / d A_k, upsampled bilinearly to H x W and scaled to [0, 1] per image: (N, H, W)."""
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda m, i, out: seen.append(out))
    try:
        with torch.enable_grad():
            logits = model(x.detach().requires_grad_(True))
            if target is None:
                target = logits.argmax(1)
            chosen = logits.gather(1, target.view(-1, 1)).sum()
            (grads,) = torch.autograd.grad(chosen, seen[-1])
    finally:
        hook.remove()
    acts = seen[-1].detach()
    weights = grads.mean((2, 3), keepdim=True)
    cam = F.relu((weights * acts).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
    low = cam.flatten(1).min(1).values.view(-1, 1, 1)
    cam = cam - low
    high = cam.flatten(1).max(1).values.view(-1, 1, 1)
    return cam / (high + 1e-7)


@register_defense("sentinet")
class SentiNet(Defense):
    """SentiNet: paste each input's Grad-CAM region onto clean images and count how often it takes over.

    Args:
        n_overlay: clean images each region is pasted onto
        mask_threshold: Grad-CAM value from which a pixel belongs to the region
        conf_threshold: average confidence on inert patterns above which an input is flagged
        layer: module whose output Grad-CAM reads (None: the architecture's feature layer)
        batch_size: inputs explained at a time
    """

    kind = "input_detection"
    paper = (
        "Chou, Tramer and Pellegrino, SentiNet: Detecting Localized Universal Attacks Against Deep Learning "
        "Systems, IEEE S&P Workshops 2020, arXiv:1812.00292"
    )
    year = 2020
    param_checks = {
        "n_overlay": cfg.positive,
        "mask_threshold": _unit_interval,
        "conf_threshold": _unit_interval,
        "batch_size": cfg.positive,
    }
    smoke_params = {"n_overlay": 8}

    def __init__(
        self,
        n_overlay: int = 100,
        mask_threshold: float = 0.85,
        conf_threshold: float = 0.9,
        layer: str | None = None,
        batch_size: int = 128,
    ):
        self.n_overlay, self.mask_threshold, self.conf_threshold = n_overlay, mask_threshold, conf_threshold
        self.layer, self.batch_size = layer, batch_size

    def transplant(
        self,
        model: Classifier,
        x: torch.Tensor,
        mask: torch.Tensor,
        label: torch.Tensor,
        clean: torch.Tensor,
        inert: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fooled fraction and average inert confidence of inputs ``x`` with regions ``mask`` (N, 1, H, W)."""
        n, k = len(x), len(clean)
        region = (x * mask).unsqueeze(1)
        keep = (1 - mask).unsqueeze(1)
        with torch.no_grad():
            on_clean = (region + clean.unsqueeze(0) * keep).flatten(0, 1)
            on_inert = (region + inert.unsqueeze(0) * keep).flatten(0, 1)
            fooled = (model(on_clean).argmax(1).view(n, k) == label[:, None]).float().mean(1)
            conf = torch.softmax(model(on_inert).float(), 1).amax(1).view(n, k).mean(1)
        return fooled, conf

    def fit(self, model: Classifier, data: DefenseData) -> InputDetector:
        model.eval()
        images, _ = data.tensors()
        generator = data.generator(1)
        count = min(self.n_overlay, len(images))
        clean = images[torch.randperm(len(images), generator=generator)[:count].to(images.device)]
        inert = torch.rand(clean.shape, generator=generator).to(images.device)
        layer = layer_module(model, self.layer)
        log.info("SentiNet: %d clean images and %d inert patterns per input", count, count)

        def detector(x: torch.Tensor) -> Detection:
            fooled, conf = [], []
            for i in range(0, len(x), self.batch_size):
                part = x[i : i + self.batch_size]
                with torch.no_grad():
                    label = model(part).argmax(1)
                mask = (grad_cam(model, layer, part, label) >= self.mask_threshold).float().unsqueeze(1)
                f, c = self.transplant(model, part, mask, label, clean, inert)
                fooled.append(f)
                conf.append(c)
            fooled_all, conf_all = torch.cat(fooled), torch.cat(conf)
            return Detection(fooled_all, conf_all > self.conf_threshold)

        return detector


if __name__ == "__main__":
    main("sentinet")
