"""SimCLR self-supervised pre-training of a backbone, shared by DBD (defense/dbd.py) and NAB
(defense/nab.py): Chen, Kornblith, Norouzi and Hinton, "A Simple Framework for Contrastive
Learning of Visual Representations", ICML 2020; BackdoorBench's utils/defense_utils/dbd
(model/model.py ``SelfModel``, model/loss.py ``SimCLRLoss``, utils_db/trainer/simclr.py,
and the augmentation of utils/aggregate_block/dataset_and_transform_generate.get_transform_self).
Not a defense itself: it registers nothing.

Two random views of every image go through the backbone (the penultimate representation of a
:class:`~utils.models.Classifier`) and a projection head (linear, batch norm, ReLU, linear to
``proj_dim``; L2-normalised); the loss (:func:`nt_xent`) pulls the two views of an image
together and pushes the other images of the batch away. Without labels the backbone cannot
learn the trigger-to-target link, which is what DBD and NAB rely on.

The views: random resized crop (scale 0.2 to 1, ratio 3/4 to 4/3, bicubic), horizontal flip
(0.5), colour jitter (brightness, contrast, saturation 0.4, hue 0.1, in a random order) with
probability 0.8, grayscale with probability 0.2, Gaussian blur (sigma 0.1 to 2) with
probability 0.5 (BackdoorBench's get_transform_self). Two implementations, chosen by the
defenses' ``simclr_augment``:

* ``batched`` (the default, :func:`batched_views`): the whole batch at once on its own
  device, each image with its own parameters (:func:`draw_view_params`, from the epoch's
  seeded generator), so that a SimCLR epoch is not bound by a Python loop over images. The
  crop, its resize and the flip are one resampling matrix per image and axis (``Ry @ x @
  Rx^T``) holding the weights of torch's antialiased bicubic resize (cubic a = -0.5, taps
  outside the crop dropped and the rest renormalised): the same numbers as torchvision's
  crop then resize, which an affine grid (``grid_sample``) would not give, since it reads
  pixels beyond the crop's edge and uses a = -0.75. The four jitters run in each image's own
  random order, as torchvision's ColorJitter draws one; the blur is a separable convolution
  with one kernel per image (grouped), with torchvision's reflect padding.
  Written on torch alone: kornia's augmentation module also draws per-image parameters, but
  it is a dependency this project does not have (setup.cfg), and the views here are checked
  against torchvision's own functions.
* ``per_image`` (:func:`simclr_views`): torchvision.transforms.v2 image by image, torch's
  global generator; the implementation before the batched one.

The batched path's deviations from the per-image one (the same distribution of views):
* Its random numbers come from the generator handed to it (the epoch's shuffling
  generator, saved at checkpoints), drawn for the whole batch at once, so the views differ
  from the per-image path's for the same seed (torchvision draws from torch's global one).
* Arithmetic: the blur is separable (two 1-d passes; torchvision convolves once with the
  2-d outer product) and the hue rotation uses the closed-form HSV-to-RGB map without
  clamping p, q, t; all equal to torchvision's within float rounding on images in [0, 1]
  (tests/test_simclr.py compares them operation by operation).
* A batch goes through the augmentation outside autocast (in its own dtype).

Deviations from BackdoorBench:
* The Gaussian blur's kernel is the odd size nearest a tenth of the image side, at least 3
  (BackdoorBench blurs with PIL's radius, which has no kernel size).
* Saturation and hue leave a one-channel image unchanged (torchvision's rule); grayscale
  of a one-channel image is the image.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from defense.training import TrainingSet
from utils import config as cfg
from utils.models import Classifier

log = logging.getLogger("saubench")

# the SimCLR stage's hyperparameters, as DBD and NAB take them: their docstring lines and checks
SIMCLR_ARGS = """        epoch_self: SimCLR epochs
        batch_size_self: SimCLR batch size
        lr_self: SimCLR SGD learning rate
        self_t_max: SimCLR cosine schedule's T_max (epochs)
        temperature: SimCLR temperature
        simclr_augment: SimCLR views: batched (whole batch, per-image parameters) or per_image (torchvision v2)
"""
SIMCLR_CHECKS = {
    "epoch_self": cfg.non_negative,
    "batch_size_self": cfg.positive,
    "lr_self": cfg.positive,
    "self_t_max": cfg.positive,
    "temperature": cfg.positive,
}

# BackdoorBench's SimCLR augmentation (get_transform_self)
CROP_SCALE, CROP_RATIO = (0.2, 1.0), (3 / 4, 4 / 3)
FLIP_P, JITTER_P, GRAY_P, BLUR_P = 0.5, 0.8, 0.2, 0.5
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
BLUR_SIGMA = (0.1, 2.0)
AUGMENT_MODES = ("batched", "per_image")


def blur_kernel_size(size: tuple[int, int]) -> int:
    """The Gaussian blur's kernel side: the odd size nearest a tenth of the image's shorter side, at least 3."""
    return max(3, round(0.1 * min(size)) // 2 * 2 + 1)


def simclr_augmentation(size: tuple[int, int]) -> v2.Compose:
    """The SimCLR view of one float image (C, H, W) in [0, 1] (BackdoorBench's values)."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(
                size, scale=CROP_SCALE, ratio=CROP_RATIO, interpolation=v2.InterpolationMode.BICUBIC, antialias=True
            ),
            v2.RandomHorizontalFlip(FLIP_P),
            v2.RandomApply(
                [v2.ColorJitter(brightness=JITTER[0], contrast=JITTER[1], saturation=JITTER[2], hue=JITTER[3])],
                p=JITTER_P,
            ),
            v2.RandomGrayscale(GRAY_P),
            v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size), sigma=BLUR_SIGMA)], p=BLUR_P),
        ]
    )


def simclr_views(x: torch.Tensor, augmentation: v2.Compose) -> torch.Tensor:
    """One random view of every image of the float batch ``x`` (N, C, H, W), drawn per image
    (torch's global generator), clamped to [0, 1]."""
    return torch.stack([augmentation(image) for image in x]).clamp_(0.0, 1.0)


# -- the batched views ------------------------------------------------------------------------


@dataclass
class ViewParams:
    """One SimCLR view's parameters for each of N images (tensors on one device).

    box: (N, 4) long, the crop's top, left, height, width in pixels; flip: (N,) bool;
    jitter: (N,) bool, whether the colour jitter applies; factors: (N, 4) the brightness,
    contrast and saturation factors and the hue shift; order: (N, 4) long, the jitters'
    order (a permutation of 0..3, in the order of ``factors``); gray: (N,) bool; blur: (N,)
    bool; sigma: (N,) the blur's standard deviation."""

    box: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor

    def to(self, device: torch.device) -> "ViewParams":
        return ViewParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @classmethod
    def neutral(cls, n: int, size: tuple[int, int]) -> "ViewParams":
        """The identity view: the whole image, no flip, jitter, grayscale or blur."""
        h, w = size
        false = torch.zeros(n, dtype=torch.bool)
        return cls(
            box=torch.tensor([[0, 0, h, w]]).repeat(n, 1),
            flip=false,
            jitter=false.clone(),
            factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(n, 1),
            order=torch.arange(4).repeat(n, 1),
            gray=false.clone(),
            blur=false.clone(),
            sigma=torch.ones(n),
        )


def _crop_boxes(n: int, size: tuple[int, int], generator: torch.Generator, tries: int = 10) -> torch.Tensor:
    """torchvision's RandomResizedCrop boxes for n images: ``tries`` draws of area share and
    log aspect ratio each, the first whose rounded box fits, else the central crop of the
    clamped ratio; a uniform position inside the image. (N, 4) long: top, left, height, width."""
    height, width = size
    dev = generator.device
    area = torch.empty(n, tries, device=dev).uniform_(*CROP_SCALE, generator=generator) * (height * width)
    log_ratio = torch.empty(n, tries, device=dev).uniform_(
        math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), generator=generator
    )
    ratio = log_ratio.exp()
    w = (area * ratio).sqrt().round().long()
    h = (area / ratio).sqrt().round().long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(1, keepdim=True)  # the first try that fits (0 if none does)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        fw, fh = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        fw, fh = int(round(height * CROP_RATIO[1])), height
    else:
        fw, fh = width, height
    none = ~fits.any(1)
    w, h = torch.where(none, fw, w), torch.where(none, fh, h)
    top = (torch.rand(n, device=dev, generator=generator) * (height - h + 1)).floor().long()
    left = (torch.rand(n, device=dev, generator=generator) * (width - w + 1)).floor().long()
    top, left = torch.where(none, (height - h) // 2, top), torch.where(none, (width - w) // 2, left)
    return torch.stack([top, left, h, w], 1)


def draw_view_params(n: int, size: tuple[int, int], generator: torch.Generator) -> ViewParams:
    """Independent SimCLR view parameters for n images of ``size`` (H, W), drawn from
    ``generator`` (on its device) with torchvision's distributions."""
    dev = generator.device

    def uniform(*shape, low=0.0, high=1.0):
        return torch.empty(*shape, device=dev).uniform_(low, high, generator=generator)

    box = _crop_boxes(n, size, generator)
    flip, jitter = uniform(n) < FLIP_P, uniform(n) < JITTER_P
    spans = torch.tensor([[max(0.0, 1 - s), 1 + s] for s in JITTER[:3]] + [[-JITTER[3], JITTER[3]]], device=dev)
    factors = spans[:, 0] + uniform(n, 4) * (spans[:, 1] - spans[:, 0])
    order = uniform(n, 4).argsort(1)
    gray, blur = uniform(n) < GRAY_P, uniform(n) < BLUR_P
    sigma = uniform(n, low=BLUR_SIGMA[0], high=BLUR_SIGMA[1])
    return ViewParams(box, flip, jitter, factors, order, gray, blur, sigma)


def _cubic(t: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel (a = -0.5: torch's antialiased bicubic, as PIL's)."""
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def resample_matrices(
    start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """(N, out_size, in_size): row o holds the weights of torch's antialiased bicubic resize
    (``interpolate(..., mode="bicubic", antialias=True)``) of the crop ``[start, start +
    length)`` of an axis to ``out_size``, over the whole axis: the cubic at the output
    pixel's centre, stretched by the scale when shrinking, taps outside the crop dropped and
    the rest renormalised."""
    scale = length.to(dtype) / out_size  # (N,)
    stretch = scale.clamp(min=1.0)[:, None, None]
    centre = (torch.arange(out_size, dtype=dtype, device=start.device) + 0.5)[None, :, None] * scale[:, None, None]
    inside = torch.arange(in_size, device=start.device)[None, None, :] - start[:, None, None]  # crop coordinate
    weights = _cubic((inside - centre + 0.5) / stretch)
    weights = weights * ((inside >= 0) & (inside < length[:, None, None]))
    return weights / weights.sum(2, keepdim=True)


def crop_matrices(start: torch.Tensor, length: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """:func:`resample_matrices` from an axis of ``size`` to itself, read from one table of
    every crop length (a crop placed at column ``size`` of a twice-wide axis), shifted by each
    crop's start: the cubic is evaluated for size + 1 lengths instead of N images."""
    lengths = torch.arange(size + 1, device=start.device)
    table = resample_matrices(torch.full_like(lengths, size), lengths.clamp(min=1), 2 * size, size, dtype)
    columns = torch.arange(size, device=start.device)[None, :] + size - start[:, None]  # (N, size)
    rows = torch.arange(size, device=start.device)[None, :, None]
    return table.reshape(-1)[(length[:, None, None] * size + rows) * (2 * size) + columns[:, None, :]]


def crop_resize_flip(x: torch.Tensor, box: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Each image's crop ``box`` (top, left, height, width) resized to the image's size
    (bicubic, antialiased, as torchvision's resized_crop), mirrored where ``flip``."""
    height, width = x.shape[-2:]
    ry = crop_matrices(box[:, 0], box[:, 2], height, x.dtype)
    rx = crop_matrices(box[:, 1], box[:, 3], width, x.dtype)
    rx = torch.where(flip[:, None, None], rx.flip(1), rx)
    return ry[:, None] @ x @ rx[:, None].transpose(-1, -2)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W): torchvision's grayscale of RGB images (ITU-R 601-2 weights)."""
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b)[:, None]


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``factor * x + (1 - factor) * other``, clamped to [0, 1] (torchvision's _blend), per image."""
    f = factor[:, None, None, None]
    return (f * x + (1 - f) * other).clamp(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor[:, None, None, None]).clamp(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    gray = _luma(x) if x.shape[1] == 3 else x
    return _blend(x, gray.mean((1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x if x.shape[1] == 1 else _blend(x, _luma(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Each RGB image's hue turned by ``shift`` (a share of the circle): the hue as torchvision
    computes it (HSV), back to RGB by the closed form ``v - (v - min) clip(min(k, 4 - k), 0, 1)``
    with ``k = (n + 6 h) mod 6`` for n = 5, 3, 1 (value and saturation unchanged)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    value, low = torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)
    spread = value - low  # v s
    sextant = torch.where(value == r, g - b, torch.where(value == g, b - r + 2 * spread, r - g + 4 * spread))
    h6 = sextant / spread.masked_fill(spread == 0, 1.0) + (6.0 + 6.0 * shift)[:, None, None]  # 6 h + 6, in [4, 12)
    h6 = torch.where(h6 >= 6.0, h6 - 6.0, h6)
    k = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device)[None, :, None, None] + h6[:, None]
    k = torch.where(k >= 6.0, k - 6.0, k)
    return value[:, None] - spread[:, None] * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


JITTERS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _on_(x: torch.Tensor, mask: torch.Tensor, fn, *args: torch.Tensor) -> torch.Tensor:
    """``x`` with ``fn(x[mask], *(a[mask] for a in args))`` written in place over the images of ``mask``."""
    index = mask.nonzero().flatten()
    if len(index) == 0:
        return x
    return x.index_copy_(0, index, fn(x[index], *(a[index] for a in args)))


def colour_jitter(x: torch.Tensor, apply: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter on the images of ``apply``, each with its own ``factors``
    (brightness, contrast, saturation, hue) in its own ``order``."""
    jitters = JITTERS if x.shape[1] == 3 else JITTERS[:2]  # saturation and hue leave one channel as it is
    x = x.clone()
    for position in range(4):
        for j, fn in enumerate(jitters):
            _on_(x, apply & (order[:, position] == j), fn, factors[:, j])
    return x


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """torchvision's grayscale, as many channels as ``x`` (a one-channel image is unchanged)."""
    return x if x.shape[1] == 1 else _luma(x).expand_as(x).contiguous()


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Each image blurred with its own ``sigma`` and a ``kernel``-wide Gaussian (torchvision's
    weights and reflect padding), as two 1-d grouped convolutions."""
    n, c, h, w = x.shape
    offsets = torch.arange(kernel, dtype=x.dtype, device=x.device) - (kernel - 1) / 2
    weights = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N * C, kernel)
    pad = kernel // 2
    y = F.pad(x, [pad] * 4, mode="reflect").reshape(1, n * c, h + 2 * pad, w + 2 * pad)
    y = F.conv2d(y, weights[:, None, None, :], groups=n * c)
    y = F.conv2d(y, weights[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def apply_view_params(x: torch.Tensor, params: ViewParams, kernel: int | None = None) -> torch.Tensor:
    """The views of the float batch ``x`` (N, C, H, W) with ``params``: crop and resize, flip,
    colour jitter, grayscale, blur (``kernel`` wide, :func:`blur_kernel_size` by default),
    clamped to [0, 1]; same shape, dtype and device, computed outside autocast."""
    kernel = blur_kernel_size(tuple(x.shape[-2:])) if kernel is None else kernel
    p = params.to(x.device)
    with torch.autocast(x.device.type, enabled=False):
        out = crop_resize_flip(x, p.box, p.flip)
        out = colour_jitter(out, p.jitter, p.factors.to(x.dtype), p.order)
        _on_(out, p.gray, grayscale)
        _on_(out, p.blur, lambda y, s: gaussian_blur(y, s, kernel), p.sigma.to(x.dtype))
        return out.clamp_(0.0, 1.0)


def batched_views(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random SimCLR view of every image of the float batch ``x`` (N, C, H, W) in [0, 1],
    each with its own parameters drawn from ``generator``; on ``x``'s device, clamped to [0, 1]."""
    return apply_view_params(x, draw_view_params(len(x), tuple(x.shape[-2:]), generator))


class SimCLRViews:
    """The SimCLR view of a batch, ``views(x, generator)``: :func:`batched_views` (``batched``)
    or torchvision per image with torch's global generator (``per_image``, ``generator`` unused)."""

    def __init__(self, size: tuple[int, int], mode: str = "batched"):
        if mode not in AUGMENT_MODES:
            raise ValueError(f"simclr_augment must be one of {AUGMENT_MODES}, not {mode!r}")
        self.mode = mode
        self.per_image = simclr_augmentation(size) if mode == "per_image" else None

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.per_image is not None:
            return simclr_views(x, self.per_image)
        return batched_views(x, generator)


def nt_xent(features: torch.Tensor, temperature: float) -> torch.Tensor:
    """BackdoorBench's SimCLR loss of ``features`` (B, 2, D), the two views of B images
    (L2-normalised): for the first view of each image, the cross-entropy of picking its
    second view among the 2B - 1 other views, with similarities ``z_i . z_j / temperature``;
    the mean over the B images."""
    b = features.shape[0]
    anchors = features[:, 0]
    contrast = torch.cat([features[:, 0], features[:, 1]], 0)  # (2B, D): first views, then second views
    logits = anchors @ contrast.T / temperature  # (B, 2B)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(b), torch.arange(b)] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = torch.arange(b, device=features.device) + b
    return F.cross_entropy(logits, positives)


class SelfModel(nn.Module):
    """A backbone (the penultimate representation of ``backbone``, a Classifier) and the
    SimCLR projection head; ``forward`` returns L2-normalised projections (N, proj_dim)."""

    def __init__(self, backbone: Classifier, feature_dim: int, proj_dim: int = 128):
        super().__init__()
        self.backbone = backbone
        self.proj_head = nn.Sequential(
            nn.Linear(feature_dim, feature_dim),
            nn.BatchNorm1d(feature_dim),
            nn.ReLU(),
            nn.Linear(feature_dim, proj_dim),
        )

    @classmethod
    def around(cls, backbone: Classifier, channels: int, size: tuple[int, int], proj_dim: int = 128) -> "SelfModel":
        """A SelfModel around ``backbone``, its feature size found with one dummy image."""
        was_training = backbone.training
        backbone.eval()
        device = next(backbone.parameters()).device
        with torch.no_grad():
            dim = backbone.penultimate(torch.zeros(1, channels, *size, device=device)).shape[1]
        backbone.train(was_training)
        return cls(backbone, dim, proj_dim).to(device)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.penultimate(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj_head(self.features(x)), dim=1)


def simclr_epoch(
    model: SelfModel,
    data: TrainingSet,
    optimizer: torch.optim.Optimizer,
    views: SimCLRViews,
    temperature: float,
    *,
    batch_size: int,
    epoch: int,
    generator: torch.Generator,
) -> float:
    """One SimCLR epoch over the training set as delivered (labels unused), shuffled and (for
    batched views) augmented with ``generator``; its mean loss."""

    def step(x, y):
        b = len(x)
        pair = torch.cat([views(x, generator), views(x, generator)], 0)
        z = model(pair)
        return nt_xent(torch.stack([z[:b], z[b:]], 1), temperature), None, None

    stats = data.train_epoch(
        model,
        optimizer,
        epoch=epoch,
        augment=False,
        step=step,
        generator=generator,
        batch_size=batch_size,
        desc=f"SimCLR {epoch}",
    )
    return stats["train_epoch_loss_avg_over_batch"]


@torch.no_grad()
def embed(fn, data: TrainingSet, batch_size: int = 256) -> torch.Tensor:
    """``fn`` (a module in eval mode, or a function of a float batch) over every training
    sample as delivered, in order: (N, D) float32 on the CPU."""
    return torch.cat([fn(x).float().cpu() for x, _ in data.batches(batch_size)])


class SimCLRStage:
    """The SimCLR stage of DBD and NAB with BackdoorBench's optimiser: SGD (``lr_self``,
    momentum 0.9, weight decay 1e-4) and a cosine schedule (T_max ``self_t_max`` epochs)
    stepped each epoch, batches of ``batch_size_self``, temperature ``temperature``, views
    ``simclr_augment`` (:class:`SimCLRViews`); read from the defense's attributes of those names."""

    def __init__(self, defense):
        self.batch_size, self.lr = defense.batch_size_self, defense.lr_self
        self.t_max, self.temperature = defense.self_t_max, defense.temperature
        self.augment = defense.simclr_augment

    def build(self, backbone: Classifier, data: TrainingSet):
        """The SelfModel around ``backbone``, its optimiser and schedule, and the views."""
        model = SelfModel.around(backbone, data.info.channels, data.info.size)
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.t_max)
        return model, optimizer, scheduler, SimCLRViews(data.info.size, self.augment)

    def epoch(
        self,
        model: SelfModel,
        data: TrainingSet,
        optimizer: torch.optim.Optimizer,
        scheduler,
        views: SimCLRViews,
        epoch: int,
        generator: torch.Generator,
    ) -> float:
        """One SimCLR epoch and a schedule step; the mean loss."""
        loss = simclr_epoch(
            model,
            data,
            optimizer,
            views,
            self.temperature,
            batch_size=self.batch_size,
            epoch=epoch,
            generator=generator,
        )
        scheduler.step()
        return loss
