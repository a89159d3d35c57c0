"""D-ST: secure training after sample distinguishment by feature sensitivity. Chen, Wu and
Wang, "Effective Backdoor Defense by Exploiting Sensitivity of Poisoned Samples", NeurIPS
2022; BackdoorBench's version (defense/d-st.py, config/defense/d-st/,
utils/defense_utils/dst/).

Idea: the SD stage (defense/sensitivity.py, shared with D-BR) splits the training set into
samples taken as clean, as poisoned and uncertain by their feature sensitivity to
transformations. D-ST then trains a fresh feature extractor with semi-supervised
contrastive learning (SS-CTL): a clean anchor's positives are the samples with its label,
a poisoned or uncertain anchor's only positive is its own other view, so the link between
a trigger and the target label is never taught; then a linear classifier on the frozen
features with a mixed cross-entropy, minimised on the clean samples and (weighted 0.001)
maximised on the poisoned ones.

Hyperparameters (BackdoorBench's config/defense/d-st/ and the values its code sets):
    sd_epochs (2), sd_finetune_epochs (10), sd_lr (0.01), sd_batch_size (128): the SD stage
    clean_ratio (0.2, alpha_c), poison_ratio (0.05, alpha_p), trans1 (rotate), trans2 (affine): the split
    sscl_epochs (200), sscl_lr (0.5), temperature (0.1): SS-CTL, SGD with momentum 0.9 and
        weight decay 5e-4, a linear warm-up from 0.01 over the first 10 epochs (per batch) and a
        cosine schedule down to sscl_lr / 1000; a projection head Linear-ReLU-Linear to 128
        dimensions, normalised; the loss scaled by temperature / 0.07 (base temperature)
    mce_epochs (10), mce_lr (5.0), poison_weight (0.001): the mixed cross-entropy, SGD with
        momentum 0.9 and weight decay 5e-4, warm-up from 0.01 to mce_lr over 10 epochs (per batch)
    batch_size: SS-CTL and mixed cross-entropy batch size (128)
Both stages see SimCLR's augmentation of each image (random resized crop, scale 0.2 to 1;
horizontal flip; colour jitter 0.4, 0.4, 0.4, 0.1 with probability 0.8; grayscale with
probability 0.2), two views for SS-CTL, one for the classifier.

Deviations:
* The augmentation is batched tensor code (:func:`contrastive_view`): the crop's size is
  clipped to the image instead of redrawn (torchvision tries 10 draws), the colour jitter's
  four parts come in a fixed order (torchvision: random), and hue is a rotation of the
  chrominance in YIQ space (torchvision: in HSV); for one-channel images saturation, hue
  and grayscale change nothing, as in torchvision.
* The SD stage's deviations: defense/sensitivity.py.
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from defense.base import main, register_defense
from defense.sensitivity import SD_ARGS, Distinguishment, SensitivityDefense, Transformation
from defense.training import Held, Phases, Recipe, TrainingSet
from utils import config as cfg

log = logging.getLogger("saubench")

CLEAN, UNCERTAIN, POISONED = 0, 1, 2
WARM_EPOCHS, WARM_FROM, BASE_TEMPERATURE, PROJECTION_DIM = 10, 0.01, 0.07, 128


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def resized_crop(
    x: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """A random crop of each image (area ``scale`` of it, aspect ``ratio``) resized back to its size (bilinear)."""
    n, _, h, w = x.shape
    area = _uniform(n, *scale, generator) * h * w
    aspect = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator))
    cw = torch.sqrt(area * aspect).round().clamp(1, w)
    ch = torch.sqrt(area / aspect).round().clamp(1, h)
    left = torch.floor(torch.rand(n, generator=generator) * (w - cw + 1))
    top = torch.floor(torch.rand(n, generator=generator) * (h - ch + 1))
    zero = torch.zeros(n)
    # output -> input in normalised coordinates: the crop's centre and half-sizes
    theta = torch.stack(
        [
            torch.stack([cw / w, zero, (2 * left + cw) / w - 1], 1),
            torch.stack([zero, ch / h, (2 * top + ch) / h - 1], 1),
        ],
        1,
    ).to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def colour_jitter(
    x: torch.Tensor,
    generator: torch.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
) -> torch.Tensor:
    """Brightness, contrast, saturation and hue changes drawn for each image."""
    n = len(x)

    def factor(s: float) -> torch.Tensor:
        return _uniform(n, 1 - s, 1 + s, generator).to(x.device).view(n, 1, 1, 1)

    x = (x * factor(brightness)).clamp(0, 1)
    c = factor(contrast)
    x = (c * x + (1 - c) * _gray(x).mean((1, 2, 3), keepdim=True)).clamp(0, 1)
    s = factor(saturation)
    angle = _uniform(n, -hue, hue, generator).to(x.device) * 2 * math.pi
    if x.shape[1] != 3:
        return x
    x = (s * x + (1 - s) * _gray(x)).clamp(0, 1)
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=x.device)
    t = torch.einsum("ij,njhw->nihw", yiq, x)
    cos, sin = torch.cos(angle).view(n, 1, 1), torch.sin(angle).view(n, 1, 1)
    i, q = t[:, 1] * cos - t[:, 2] * sin, t[:, 1] * sin + t[:, 2] * cos
    t = torch.stack([t[:, 0], i, q], 1)
    return torch.einsum("ij,njhw->nihw", torch.linalg.inv(yiq), t).clamp(0, 1)


def contrastive_view(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """SimCLR's augmentation of each image (see the module docstring), parameters from ``generator`` (CPU)."""
    n = len(x)
    x = resized_crop(x, generator)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device).view(n, 1, 1, 1)
    x = torch.where(flip, x.flip(-1), x)
    jitter = (torch.rand(n, generator=generator) < 0.8).to(x.device).view(n, 1, 1, 1)
    x = torch.where(jitter, colour_jitter(x, generator), x)
    gray = (torch.rand(n, generator=generator) < 0.2).to(x.device).view(n, 1, 1, 1)
    return torch.where(gray, _gray(x).expand_as(x), x)


def consistency_supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    flags: torch.Tensor,
    temperature: float = 0.1,
    base_temperature: float = BASE_TEMPERATURE,
) -> torch.Tensor:
    """SS-CTL's loss of ``features`` (bsz, views, d; normalised): supervised contrastive for
    clean anchors (positives: every other view with the same label), self-supervised for
    the others (positive: their own other views); BackdoorBench's SupConLoss_Consistency."""
    bsz, views = features.shape[:2]
    positive = (labels.view(-1, 1) == labels.view(1, -1)).float()
    other = flags != CLEAN
    positive[other] = 0.0
    positive[other, other.nonzero().flatten()] = 1.0  # own sample only (the paired index of BackdoorBench)
    positive = positive.repeat(views, views)
    flat = torch.cat(torch.unbind(features, 1), 0)
    logits = flat @ flat.T / temperature
    logits = logits - logits.max(1, keepdim=True).values.detach()
    not_self = 1.0 - torch.eye(bsz * views, device=flat.device)
    positive = positive * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    mean_log_prob = (positive * log_prob).sum(1) / positive.sum(1)
    return -(temperature / base_temperature) * mean_log_prob.mean()


def mixed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, flags: torch.Tensor, poison_weight: float
) -> torch.Tensor:
    """CE on the samples taken as clean minus ``poison_weight`` x CE on those taken as poisoned
    (uncertain ones left out); an empty part adds 0 (BackdoorBench: NaN)."""

    def part(mask: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[mask], labels[mask]) if bool(mask.any()) else logits.sum() * 0.0

    return part(flags == CLEAN) - poison_weight * part(flags == POISONED)


def sscl_rate(lr: float, epoch: int, epochs: int, batch: int, batches: int) -> float:
    """BackdoorBench's SS-CTL rate at 1-based ``epoch`` and 0-based ``batch``: cosine from
    ``lr`` to lr/1000, linear warm-up from 0.01 over the first 10 epochs."""
    eta_min = lr * 0.1**3
    if epoch <= WARM_EPOCHS:
        warm_to = eta_min + (lr - eta_min) * (1 + math.cos(math.pi * WARM_EPOCHS / epochs)) / 2
        return WARM_FROM + (batch + (epoch - 1) * batches) / (WARM_EPOCHS * batches) * (warm_to - WARM_FROM)
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2


def mce_rate(lr: float, epoch: int, batch: int, batches: int) -> float:
    """BackdoorBench's mixed cross-entropy rate: warm-up from 0.01 to ``lr`` over 10 epochs, then ``lr``."""
    if epoch <= WARM_EPOCHS:
        return WARM_FROM + (batch + (epoch - 1) * batches) / (WARM_EPOCHS * batches) * (lr - WARM_FROM)
    return lr


@register_defense("dst", aliases=("d-st", "d_st"))
class DST(SensitivityDefense):
    __doc__ = (
        "D-ST: split the training set by feature sensitivity; train securely (SS-CTL features, mixed CE).\n\n"
        "    Args:\n"
        + SD_ARGS
        + """        sscl_epochs: SS-CTL epochs
        sscl_lr: SS-CTL learning rate
        temperature: SS-CTL temperature
        mce_epochs: mixed cross-entropy epochs
        mce_lr: mixed cross-entropy learning rate
        poison_weight: weight of the ascended cross-entropy of the samples taken as poisoned
        batch_size: SS-CTL and mixed cross-entropy batch size
"""
    )

    param_checks = {
        **Distinguishment.PARAM_CHECKS,
        "sscl_epochs": cfg.non_negative,
        "sscl_lr": cfg.positive,
        "temperature": cfg.positive,
        "mce_epochs": cfg.non_negative,
        "mce_lr": cfg.positive,
        "poison_weight": cfg.non_negative,
        "batch_size": cfg.positive,
    }
    smoke_params = {"sd_epochs": 1, "sd_finetune_epochs": 1, "sscl_epochs": 1, "mce_epochs": 1}

    def __init__(
        self,
        sd_epochs: int = 2,
        sd_finetune_epochs: int = 10,
        sd_lr: float = 0.01,
        sd_batch_size: int = 128,
        clean_ratio: float = 0.2,
        poison_ratio: float = 0.05,
        trans1: Transformation = "rotate",
        trans2: Transformation = "affine",
        sscl_epochs: int = 200,
        sscl_lr: float = 0.5,
        temperature: float = 0.1,
        mce_epochs: int = 10,
        mce_lr: float = 5.0,
        poison_weight: float = 0.001,
        batch_size: int = 128,
    ):
        self.keep_split_params(
            sd_epochs, sd_finetune_epochs, sd_lr, sd_batch_size, clean_ratio, poison_ratio, trans1, trans2
        )
        self.sscl_epochs, self.sscl_lr, self.temperature = sscl_epochs, sscl_lr, temperature
        self.mce_epochs, self.mce_lr, self.poison_weight = mce_epochs, mce_lr, poison_weight
        self.batch_size = batch_size

    def phases(self) -> Phases:
        return Phases(("sd", self.sd.epochs), ("sscl", self.sscl_epochs), ("mce", self.mce_epochs))

    def total_epochs(self, recipe: Recipe) -> int:
        return self.phases().total

    def train(self, data: TrainingSet) -> nn.Module:
        model, sd_model = data.new_model(), data.new_model()
        dim = model.classifier_layer().in_features
        head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, PROJECTION_DIM)).to(data.device)
        sd_optimizer, sd_scheduler = self.sd.optimizer(sd_model)
        classifier = model.classifier_layer()
        encoder_params = [p for name, p in model.named_parameters() if not any(p is q for q in classifier.parameters())]
        sscl_optimizer = torch.optim.SGD(
            [*encoder_params, *head.parameters()], lr=self.sscl_lr, momentum=0.9, weight_decay=5e-4
        )
        mce_optimizer = torch.optim.SGD(classifier.parameters(), lr=self.mce_lr, momentum=0.9, weight_decay=5e-4)
        generator, views, held = data.generator(), data.generator(2), Held()
        start = data.resume(
            model=model,
            sd_model=sd_model,
            head=head,
            optimizers=[sd_optimizer, sscl_optimizer, mce_optimizer],
            scheduler=sd_scheduler,
            generators=[generator, views],
            held=held,
        )
        phases = self.phases()
        for epoch in range(start, phases.total):
            phase, e = phases.of(epoch)
            if phase == "sd":
                data.report(
                    epoch, model, sd_loss=self.sd.epoch(data, sd_model, sd_optimizer, sd_scheduler, e, epoch, generator)
                )
                continue
            if "flags" not in held:
                clean, poisoned = self.sd.split(data, sd_model, data.generator(1))
                flags = torch.full((len(data),), UNCERTAIN, dtype=torch.long)
                flags[clean], flags[poisoned] = CLEAN, POISONED
                held["flags"] = flags
            # the flags travel with the labels through the shared loop: label * 3 + flag
            coded = data.train.labels * 3 + held["flags"]
            batches = math.ceil(len(data) / self.batch_size)
            if phase == "sscl":
                step = self.sscl_step(model, head, sscl_optimizer, e + 1, batches, views)
                stats = data.train_epoch(
                    model,
                    sscl_optimizer,
                    labels=coded,
                    epoch=epoch,
                    augment=False,
                    step=step,
                    generator=generator,
                    batch_size=self.batch_size,
                    desc=f"SS-CTL {e}",
                )
                head.train()
            else:
                step = self.mce_step(model, classifier, mce_optimizer, e + 1, batches, views)
                stats = data.train_epoch(
                    model,
                    mce_optimizer,
                    labels=coded,
                    epoch=epoch,
                    augment=False,
                    step=step,
                    generator=generator,
                    batch_size=self.batch_size,
                    desc=f"mixed CE {e}",
                )
            data.report(epoch, model, **{f"{phase}_loss": stats["train_epoch_loss_avg_over_batch"]})
        # each training sample's flag from the SD stage: 0 taken as clean, 1 uncertain, 2 taken as poisoned
        # (none when no epoch ran past the split)
        flags = held.get("flags")
        data.add_extras(flags=flags)
        data.add_summary(taken_as_clean=int((flags == CLEAN).sum()), taken_as_poisoned=int((flags == POISONED).sum()))
        return model.eval()

    def sscl_step(
        self,
        model: nn.Module,
        head: nn.Module,
        optimizer: torch.optim.Optimizer,
        epoch: int,
        batches: int,
        views: torch.Generator,
    ):
        """The SS-CTL loss of a batch of two views of each image, with the batch's learning rate."""
        counter = iter(range(batches))

        def step(x, coded):
            for group in optimizer.param_groups:
                group["lr"] = sscl_rate(self.sscl_lr, epoch, self.sscl_epochs, next(counter, batches - 1), batches)
            labels, flags = coded // 3, coded % 3
            both = torch.cat([contrastive_view(x, views), contrastive_view(x, views)])
            projected = F.normalize(head(model.penultimate(both)), dim=1)
            features = torch.stack(projected.split(len(x)), 1)
            return consistency_supcon_loss(features, labels, flags, self.temperature), None, None

        return step

    def mce_step(
        self,
        model: nn.Module,
        classifier: nn.Module,
        optimizer: torch.optim.Optimizer,
        epoch: int,
        batches: int,
        views: torch.Generator,
    ):
        """The mixed cross-entropy of the linear classifier on the frozen features of one view."""
        counter = iter(range(batches))

        def step(x, coded):
            for group in optimizer.param_groups:
                group["lr"] = mce_rate(self.mce_lr, epoch, next(counter, batches - 1), batches)
            labels, flags = coded // 3, coded % 3
            model.eval()
            with torch.no_grad():
                features = model.penultimate(contrastive_view(x, views))
            logits = classifier(features)
            return mixed_cross_entropy(logits, labels, flags, self.poison_weight), logits, labels

        return step


if __name__ == "__main__":
    main("dst")
