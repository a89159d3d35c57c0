"""Input-Aware dynamic backdoor: Nguyen and Tran, "Input-Aware Dynamic Backdoor Attack",
NeurIPS 2020.

Every input gets its own trigger. A generator G makes a pattern G(x) and a mask generator
M a soft mask m(x) = T(M(x)), T(a) = tanh(20 a - 10) / 2 + 1/2; the poisoned image is

    B(x) = x + (G(x) - x) * m(x).

M is first trained alone (``clean_train_epochs`` epochs) to make sparse masks (mean above
``mask_density`` costs lambda_norm) that differ between inputs (diversity loss
||x1 - x2|| / ||m(x1) - m(x2)||, weight lambda_div), then frozen. The classifier and G
are then trained together (training-controlled): in every shuffled, augmented batch of
size B, int(pratio * B) samples are poisoned with their own trigger and get the
attacker's label, as many "cross" samples get the trigger of another, random training
image and keep their true label, and G minimises the classifier's loss plus lambda_div
times the diversity loss of its patterns.

The backdoor test set is made with the trained generators at every evaluation; the cross
test set (the record's ``cross_test``) pairs each test image with another image of the
same test batch (a random cyclic pairing) and keeps its true label. The generators'
weights are kept in the record: ``extras["netG.<key>"]`` and ``extras["netM.<key>"]``
(their state_dicts), from which :func:`generators_from_extras` rebuilds them.

Generators (BackdoorBench's): conv-BN-ReLU encoder-decoders, 16 channels and 2 poolings
for 1-channel images (BackdoorBench's MNIST setting), 32 channels and 3 poolings
otherwise (fewer where the image side is not divisible by 2^3), tanh output in [0, 1];
they see normalised images, as the classifier does.

Hyperparameters (BackdoorBench's config/attack/inputaware/default.yaml):
    lr_G: 0.01, lr_M: 0.01 (Adam, betas 0.5 and 0.9)
    lambda_div: 1, lambda_norm: 100, mask_density: 0.032
    clean_train_epochs: 25 (mask pre-training)
    schedulerG_milestones: [200, 300, 400, 500], schedulerG_lambda: 0.1 (per epoch)
    schedulerM_milestones: [10, 20], schedulerM_lambda: 0.1

Deviations from BackdoorBench: the classifier follows the dataset's recipe (BackdoorBench:
SGD 0.01 with MultiStepLR at epoch 100, i.e. a constant rate over 100 epochs, the same
optimizer otherwise); the second, independently shuffled loader is replaced by random
training images drawn per batch; no poisoned training set is kept at rest (``bd_train``
is None).

    python attack/inputaware.py --dataset digits --save_folder_name inputaware_digits
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import contextlib
import logging
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from attack.base import Attack, AttackContext, Training, main, register_attack
from utils.config import non_negative, positive, unit_interval
from utils.errors import UserError
from utils.models import Normalize

log = logging.getLogger("saubench")

EPSILON = 1e-7


def _block(cin: int, cout: int, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, momentum=0.05)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class Generator(nn.Module):
    """An encoder-decoder from images in [0, 1] to ``out_channels`` maps in [0, 1]."""

    def __init__(
        self, in_channels: int, out_channels: int, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
    ):
        super().__init__()
        width, steps = (16, 2) if in_channels == 1 else (32, 3)
        while steps > 0 and (size[0] % 2**steps or size[1] % 2**steps):
            steps -= 1
        if steps == 0:
            raise UserError(f"inputaware: the generators need an even image size, got {size[0]}x{size[1]}")
        self.normalize = Normalize(mean, std)
        layers, c = [], in_channels
        for i in range(steps):
            w = width * 2**i
            layers += [_block(c, w), _block(w, w), nn.MaxPool2d(2)]
            c = w
        layers.append(_block(c, c))
        for i in reversed(range(steps)):
            c = width * 2**i
            layers += [
                nn.Upsample(scale_factor=2, mode="bilinear"),
                _block(c, c),
                _block(c, c // 2 if i else out_channels, relu=i > 0),
            ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(self.normalize(x))) / (2 + EPSILON) + 0.5


def threshold(m: torch.Tensor) -> torch.Tensor:
    """Input-Aware's soft binarisation of the mask generator's output."""
    return torch.tanh(m * 20 - 10) / (2 + EPSILON) + 0.5


def diversity(x1: torch.Tensor, x2: torch.Tensor, out1: torch.Tensor, out2: torch.Tensor) -> torch.Tensor:
    """Mean of ||x1 - x2|| / ||out1 - out2|| (RMS distances per sample): small when
    different inputs get different patterns or masks."""
    dist_x = (x1 - x2).pow(2).mean(dim=(1, 2, 3)).sqrt()
    dist_out = (out1 - out2).float().pow(2).mean(dim=(1, 2, 3)).sqrt()
    return (dist_x / (dist_out + EPSILON)).mean()


def generators_from_extras(
    extras: dict[str, torch.Tensor], channels: int, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> tuple[Generator, Generator]:
    """G and M of a record, in eval mode, from its extras."""
    nets = Generator(channels, channels, size, mean, std), Generator(channels, 1, size, mean, std)
    for prefix, net in zip(("netG.", "netM."), nets):
        net.load_state_dict({k[len(prefix) :]: v for k, v in extras.items() if k.startswith(prefix)})
    return nets[0].eval(), nets[1].eval()


def backdoor(x: torch.Tensor, net_g: nn.Module, net_m: nn.Module, source: torch.Tensor | None = None) -> torch.Tensor:
    """x + (G(s) - x) * T(M(s)) with s = ``source`` (default: x itself)."""
    s = x if source is None else source
    return x + (net_g(s) - x) * threshold(net_m(s))


@contextlib.contextmanager
def evaluating(*nets: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; the previous modes after."""
    modes = [net.training for net in nets]
    try:
        for net in nets:
            net.eval()
        with torch.no_grad():
            yield
    finally:
        for net, mode in zip(nets, modes):
            net.train(mode)


@register_attack("inputaware")
class InputAware(Attack):
    """Input-Aware: a generated, input-specific trigger, training-controlled.

    Args:
        lr_G: Adam learning rate of the pattern generator
        lr_M: Adam learning rate of the mask generator
        lambda_div: weight of the diversity loss
        lambda_norm: weight of the mask-density loss
        mask_density: mask density above which masks are penalised
        clean_train_epochs: epochs of mask-generator pre-training
        schedulerG_milestones: epochs at which the generator's learning rate drops
        schedulerG_lambda: factor of each drop of the generator's learning rate
        schedulerM_milestones: pre-training epochs at which the mask generator's learning rate drops
        schedulerM_lambda: factor of each drop of the mask generator's learning rate
    """

    kind = "training-controlled"
    trigger_trained = True
    paper = "Nguyen and Tran, Input-Aware Dynamic Backdoor Attack, NeurIPS 2020"
    year = 2020

    param_checks = {
        "lr_G": positive,
        "lr_M": positive,
        "lambda_div": non_negative,
        "lambda_norm": non_negative,
        "mask_density": unit_interval,
        "clean_train_epochs": non_negative,
        "schedulerG_lambda": positive,
        "schedulerM_lambda": positive,
    }
    smoke_params = {"clean_train_epochs": 2}

    def __init__(
        self,
        lr_G: float = 0.01,
        lr_M: float = 0.01,
        lambda_div: float = 1.0,
        lambda_norm: float = 100.0,
        mask_density: float = 0.032,
        clean_train_epochs: int = 25,
        schedulerG_milestones: list[int] = (200, 300, 400, 500),
        schedulerG_lambda: float = 0.1,
        schedulerM_milestones: list[int] = (10, 20),
        schedulerM_lambda: float = 0.1,
    ):
        self.lr_G, self.lr_M = lr_G, lr_M
        self.lambda_div, self.lambda_norm = lambda_div, lambda_norm
        self.mask_density = mask_density
        self.clean_train_epochs = clean_train_epochs
        self.schedulerG_milestones, self.schedulerG_lambda = list(schedulerG_milestones), schedulerG_lambda
        self.schedulerM_milestones, self.schedulerM_lambda = list(schedulerM_milestones), schedulerM_lambda
        self.net_g: Generator | None = None
        self.net_m: Generator | None = None

    def prepare(self, ctx: AttackContext) -> None:
        info = ctx.dataset.info
        self.net_g = Generator(info.channels, info.channels, info.size, info.mean, info.std).to(ctx.device)
        self.net_m = Generator(info.channels, 1, info.size, info.mean, info.std).to(ctx.device)
        self._generator = torch.Generator().manual_seed(ctx.seed())

    # -- the triggers --------------------------------------------------------------------------------

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        device = next(self.net_g.parameters()).device
        with evaluating(self.net_g, self.net_m):
            return backdoor(x.to(device), self.net_g, self.net_m).to(x.device)

    def cross(self, x: torch.Tensor) -> torch.Tensor:
        """Each image with the trigger of another image of the batch (a random cyclic pairing)."""
        device = next(self.net_g.parameters()).device
        order = torch.randperm(len(x), generator=self._generator)
        partner = torch.empty_like(order)
        partner[order] = order.roll(-1)
        source = x[partner] if len(x) > 1 else x.flip(-1)
        with evaluating(self.net_g, self.net_m):
            return backdoor(x.to(device), self.net_g, self.net_m, source.to(device)).to(x.device)

    # -- training --------------------------------------------------------------------------------------

    def before_training(self, training: Training) -> None:
        """Pre-train the mask generator, freeze it, and add G's optimizer to the training."""
        opt_m = torch.optim.Adam(self.net_m.parameters(), self.lr_M, betas=(0.5, 0.9))
        sched_m = torch.optim.lr_scheduler.MultiStepLR(opt_m, self.schedulerM_milestones, self.schedulerM_lambda)
        self.net_m.train()
        for epoch in range(self.clean_train_epochs):
            stats = training.run_epoch(
                lambda x, y: (self._mask_loss(training, x), None, None), [opt_m], epoch=epoch, desc=f"mask {epoch}"
            )
            sched_m.step()
            log.info("mask pre-training epoch %d: loss %.4f", epoch, stats["train_epoch_loss_avg_over_batch"])
        self.net_m.eval().requires_grad_(False)
        opt_g = torch.optim.Adam(self.net_g.parameters(), self.lr_G, betas=(0.5, 0.9))
        training.optimizers.append(opt_g)
        training.schedulers.append(
            torch.optim.lr_scheduler.MultiStepLR(opt_g, self.schedulerG_milestones, self.schedulerG_lambda)
        )

    def _mask_loss(self, training: Training, x: torch.Tensor) -> torch.Tensor:
        x2 = training.sample(len(x))
        m1, m2 = threshold(self.net_m(x)), threshold(self.net_m(x2))
        density = F.relu(m1 - self.mask_density).mean()
        return self.lambda_norm * density + self.lambda_div * diversity(x, x2, m1, m2)

    def train_step(
        self, training: Training, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.net_g.train()
        n = len(x)
        n_bd = training.policy.count(n, self._generator)
        n_cross = min(n_bd, n - n_bd)
        parts, loss_div = [], 0.0
        if n_bd:
            patterns = self.net_g(x[:n_bd])
            parts.append(x[:n_bd] + (patterns - x[:n_bd]) * threshold(self.net_m(x[:n_bd])))
        if n_cross:
            x2 = training.sample(n_cross)
            patterns2 = self.net_g(x2)
            clean = x[n_bd : n_bd + n_cross]
            parts.append(clean + (patterns2 - clean) * threshold(self.net_m(x2)))
            loss_div = self.lambda_div * diversity(x[:n_cross], x2, patterns[:n_cross], patterns2)
        inputs = torch.cat([*parts, x[n_bd + n_cross :]])
        targets = torch.cat([training.policy.relabel(y[:n_bd]), y[n_bd:]])
        logits = training.model(inputs)
        return F.cross_entropy(logits, targets) + loss_div, logits, targets

    def extras(self) -> dict[str, torch.Tensor]:
        out = {f"netG.{k}": v.detach().cpu().clone() for k, v in self.net_g.state_dict().items()}
        out.update({f"netM.{k}": v.detach().cpu().clone() for k, v in self.net_m.state_dict().items()})
        return out


if __name__ == "__main__":
    main("inputaware")
