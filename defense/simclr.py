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

The views (:func:`simclr_views`, torchvision.transforms.v2 on tensors, drawn per image):
random resized crop (scale 0.2 to 1, ratio 3/4 to 4/3, bicubic), horizontal flip (0.5),
colour jitter (brightness, contrast, saturation 0.4, hue 0.1) with probability 0.8,
grayscale with probability 0.2, Gaussian blur (sigma 0.1 to 2) with probability 0.5.

Deviations from BackdoorBench:
* The Gaussian blur's kernel is the odd size nearest a tenth of the image side, at least 3
  (BackdoorBench blurs with PIL's radius, which has no kernel size).
* Saturation and hue leave a one-channel image unchanged (torchvision's rule); grayscale
  of a one-channel image is the image.
"""
from __future__ import annotations

import logging

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
"""
SIMCLR_CHECKS = {"epoch_self": cfg.non_negative, "batch_size_self": cfg.positive, "lr_self": cfg.positive,
                 "self_t_max": cfg.positive, "temperature": cfg.positive}


def simclr_augmentation(size: tuple[int, int]) -> v2.Compose:
    """The SimCLR view of one float image (C, H, W) in [0, 1] (BackdoorBench's values)."""
    kernel = max(3, round(0.1 * min(size)) // 2 * 2 + 1)
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.2, 1.0), ratio=(0.75, 4 / 3),
                             interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(0.5),
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)], p=0.8),
        v2.RandomGrayscale(0.2),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
    ])


def simclr_views(x: torch.Tensor, augmentation: v2.Compose) -> torch.Tensor:
    """One random view of every image of the float batch ``x`` (N, C, H, W), drawn per image
    (torch's global generator), clamped to [0, 1]."""
    return torch.stack([augmentation(image) for image in x]).clamp_(0.0, 1.0)


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
        self.proj_head = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.BatchNorm1d(feature_dim), nn.ReLU(),
                                       nn.Linear(feature_dim, proj_dim))

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


def simclr_epoch(model: SelfModel, data: TrainingSet, optimizer: torch.optim.Optimizer, augmentation: v2.Compose,
                 temperature: float, *, batch_size: int, epoch: int, generator: torch.Generator) -> float:
    """One SimCLR epoch over the training set as delivered (labels unused); its mean loss."""
    def step(x, y):
        b = len(x)
        views = torch.cat([simclr_views(x, augmentation), simclr_views(x, augmentation)], 0)
        z = model(views)
        return nt_xent(torch.stack([z[:b], z[b:]], 1), temperature), None, None

    stats = data.train_epoch(model, optimizer, epoch=epoch, augment=False, step=step, generator=generator,
                             batch_size=batch_size, desc=f"SimCLR {epoch}")
    return stats["train_epoch_loss_avg_over_batch"]


@torch.no_grad()
def embed(fn, data: TrainingSet, batch_size: int = 256) -> torch.Tensor:
    """``fn`` (a module in eval mode, or a function of a float batch) over every training
    sample as delivered, in order: (N, D) float32 on the CPU."""
    return torch.cat([fn(x).float().cpu() for x, _ in data.batches(batch_size)])


class SimCLRStage:
    """The SimCLR stage of DBD and NAB with BackdoorBench's optimiser: SGD (``lr_self``,
    momentum 0.9, weight decay 1e-4) and a cosine schedule (T_max ``self_t_max`` epochs)
    stepped each epoch, batches of ``batch_size_self``, temperature ``temperature``; read
    from the defense's attributes of those names."""

    def __init__(self, defense):
        self.batch_size, self.lr = defense.batch_size_self, defense.lr_self
        self.t_max, self.temperature = defense.self_t_max, defense.temperature

    def build(self, backbone: Classifier, data: TrainingSet):
        """The SelfModel around ``backbone``, its optimiser and schedule, and the augmentation."""
        model = SelfModel.around(backbone, data.info.channels, data.info.size)
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.t_max)
        return model, optimizer, scheduler, simclr_augmentation(data.info.size)

    def epoch(self, model: SelfModel, data: TrainingSet, optimizer: torch.optim.Optimizer, scheduler,
              augmentation: v2.Compose, epoch: int, generator: torch.Generator) -> float:
        """One SimCLR epoch and a schedule step; the mean loss."""
        loss = simclr_epoch(model, data, optimizer, augmentation, self.temperature, batch_size=self.batch_size,
                            epoch=epoch, generator=generator)
        scheduler.step()
        return loss
