"""SSBA: Li, Li, Wu, Li, He and Lyu, "Invisible Backdoor Attack with Sample-Specific Triggers",
ICCV 2021 (arXiv:2012.03816).

The trigger is a fixed bit string (the attacker's "secret") hidden in each image by a
StegaStamp-style encoder/decoder pair, so it is invisible and different for every image:

    x' = E(x, s) = clip(x + bound * tanh(U([x, relu(m)]) + m), 0, 1),   m = A s,   D(x') ~ s,

(U a U-Net, A a linear layer that spreads the string over the image's pixels),

E and D trained together on the dataset's training images with random bit strings (so that
E must really encode its message and D read it), minimising

    BCE_loss_weight * BCE(D(x'), s) + w_t * ||x' - x||^2,   w_t = l2_loss_weight * clip((t - await) / ramp, 0, 1),

w_t the image-fidelity weight that StegaStamp switches on after ``l2_loss_await`` steps and
raises linearly over ``l2_loss_ramp`` steps. Then every poisoned image carries the one fixed
string: dirty-label, ``pratio`` of the training set get E(x, s) and the attacker's label,
and the backdoor test set is every non-target test image through E. The encoder's outputs
(the poisoned training and test images) are the record's ``bd_train`` and ``bd_test``,
covered by its digests; the string, the decoder's bit accuracy on the stored (uint8)
poisoned training images and their mean absolute residual are kept in ``extras``.

Hyperparameters (BackdoorBench's resource/ssba/train.py and readme, and
config/attack/ssba/default.yaml):
    secret: "abcd" (embed_fingerprints.py --secret; BackdoorBench encodes it with a BCH code)
    fingerprint_length: 100 (bits of the string)
    encoder_epochs: 20 (passes over the training images)
    encoder_batch_size: 64
    encoder_lr: 1e-4 (Adam)
    l2_loss_weight: 10, l2_loss_await: 1000, l2_loss_ramp: 3000 (steps)
    bce_loss_weight: 1
    max_residual: 16 (bound of the residual, on the 0..255 scale; not in BackdoorBench, see below)
    width: 32 (the encoder's first-level channels)
    pratio (harness): 0.1, dirty-label

Per-dataset values: digits (8x8, config/attack/ssba/digits.yaml) and Fashion-MNIST
(config/attack/ssba/fashion_mnist.yaml) train the encoder for fewer steps with a larger
learning rate, a shorter string and a residual bound of 32, declared in their yamls. On
digits the decoder reads the 8-bit string from the stored poisoned training images at bit
accuracy 0.75 (seed 0; extras["bit_accuracy"]): the residual is a trigger the victim learns
(ASR 0.99, docs/results.md), but not yet a reliable message. On Fashion-MNIST the 16-bit
string is read at bit accuracy 1.000 after one encoder epoch.

Deviations from BackdoorBench (whose poisoned images are files made beforehand with
resource/ssba): the encoder/decoder are trained in the run, seeded, on the run's training
split; the encoder is a one-level U-Net at the image's resolution and the decoder convolutions
with an adaptive pooling (StegaStamp's nets need sides that are multiples of 16); the spread
string m is also added before the tanh (StegaStamp feeds it to the U-Net only): without it,
short runs stay at chance, the decoder unable to find a message the encoder has not yet
learned to write; the encoder
outputs a residual bounded by ``max_residual`` (BackdoorBench's default outputs the image
through a sigmoid, bounded only by the L2 loss); the decoder reads the encoded images
with the noise of rounding to the 256 levels they are stored with (uniform, one level); the string is
the UTF-8 bits of ``secret`` padded with spaces to ``fingerprint_length`` bits, without
BCH error correction (bchlib is not a dependency).

    python attack/ssba.py --dataset digits --save_folder_name ssba_digits
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attack.base import Attack, AttackContext, main, register_attack
from attack.hiding import ResidualEncoder, conv_stack, in_batches, train_hiding
from utils.config import non_negative, positive
from utils.poison import to_uint8

log = logging.getLogger("saubench")


def secret_bits(secret: str, length: int) -> torch.Tensor:
    """The UTF-8 bits of ``secret`` (most significant first), padded with spaces to ``length``
    bits and cut there: a float tensor of 0s and 1s."""
    data = secret.encode("utf-8")
    data += b" " * max(0, math.ceil(length / 8) - len(data))
    bits = [(byte >> (7 - i)) & 1 for byte in data for i in range(8)]
    return torch.tensor(bits[:length], dtype=torch.float32)


def rounding_noise(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``x`` plus uniform noise of one uint8 level (-0.5 .. 0.5 / 255): the error of storing it as uint8."""
    return x + (torch.rand(x.shape, generator=generator) - 0.5).to(x.device) / 255


class StegaEncoder(nn.Module):
    """E(x, s): the bit string spread over the image by a linear layer (ReLU), then the residual U-Net."""

    def __init__(self, channels: int, size: tuple[int, int], bits: int, width: int, bound: float):
        super().__init__()
        self.size = size
        self.secret_dense = nn.Linear(bits, channels * size[0] * size[1])
        self.net = ResidualEncoder(channels, channels, width, bound)

    def message(self, bits: torch.Tensor, channels: int) -> torch.Tensor:
        return self.secret_dense(bits).view(len(bits), channels, *self.size)

    def forward(self, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        message = self.message(bits, x.shape[1])
        return self.net(x, F.relu(message), message)


class StegaDecoder(nn.Module):
    """D(x'): bit logits from strided convolutions, an adaptive 4x4 pooling and two dense layers."""

    def __init__(self, channels: int, bits: int, width: int):
        super().__init__()
        self.features = conv_stack(channels, [width, width, 2 * width, 2 * width, 4 * width], [1, 2, 1, 2, 1])
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.dense = nn.Sequential(nn.Linear(4 * width * 16, 512), nn.ReLU(), nn.Linear(512, bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.pool(self.features(x)).flatten(1))


def bit_accuracy(logits: torch.Tensor, bits: torch.Tensor) -> float:
    """Share of bits the decoder's logits get right."""
    return float(((logits > 0).float() == bits).float().mean())


@register_attack("ssba")
class SSBA(Attack):
    """SSBA: a fixed string hidden in each image by a trained StegaStamp encoder, dirty-label.

    Args:
        secret: the string every poisoned image carries
        fingerprint_length: bits of the string (and of the random strings the encoder trains on)
        max_residual: largest change of a pixel, on the 0..255 scale
        width: channels of the encoder's and decoder's first layers
        encoder_epochs: passes over the training images when training the encoder/decoder
        encoder_batch_size: batch size of that training
        encoder_lr: Adam's learning rate there
        l2_loss_weight: final weight of the image-fidelity (MSE) loss
        l2_loss_await: steps before the MSE loss is switched on
        l2_loss_ramp: steps over which its weight rises to l2_loss_weight
        bce_loss_weight: weight of the decoder's bit loss (BCE)
    """

    kind = "dirty-label"
    paper = "Li, Li, Wu, Li, He and Lyu, Invisible Backdoor Attack with Sample-Specific Triggers, ICCV 2021"
    year = 2021

    param_checks = {
        "fingerprint_length": positive,
        "max_residual": positive,
        "width": positive,
        "encoder_epochs": non_negative,
        "encoder_batch_size": positive,
        "encoder_lr": positive,
        "l2_loss_weight": non_negative,
        "l2_loss_await": non_negative,
        "l2_loss_ramp": positive,
        "bce_loss_weight": non_negative,
    }
    smoke_params = {"encoder_epochs": 1, "fingerprint_length": 8, "width": 8}

    def __init__(
        self,
        secret: str = "abcd",
        fingerprint_length: int = 100,
        max_residual: float = 16.0,
        width: int = 32,
        encoder_epochs: int = 20,
        encoder_batch_size: int = 64,
        encoder_lr: float = 1e-4,
        l2_loss_weight: float = 10.0,
        l2_loss_await: int = 1000,
        l2_loss_ramp: int = 3000,
        bce_loss_weight: float = 1.0,
    ):
        self.secret = secret
        self.fingerprint_length = fingerprint_length
        self.max_residual = max_residual
        self.width = width
        self.encoder_epochs = encoder_epochs
        self.encoder_batch_size = encoder_batch_size
        self.encoder_lr = encoder_lr
        self.l2_loss_weight = l2_loss_weight
        self.l2_loss_await = l2_loss_await
        self.l2_loss_ramp = l2_loss_ramp
        self.bce_loss_weight = bce_loss_weight
        self.bits = secret_bits(secret, fingerprint_length)
        self.encoder: StegaEncoder | None = None
        self.decoder: StegaDecoder | None = None
        self.device = torch.device("cpu")
        self.stats: dict[str, float] = {}

    def build(self, channels: int, size: tuple[int, int]) -> None:
        """Fresh (untrained) encoder and decoder for images of ``channels`` x ``size``."""
        self.encoder = StegaEncoder(channels, size, self.fingerprint_length, self.width, self.max_residual / 255)
        self.decoder = StegaDecoder(channels, self.fingerprint_length, self.width)

    def l2_weight(self, step: int) -> float:
        ramp = (step - self.l2_loss_await) / self.l2_loss_ramp
        return self.l2_loss_weight * min(max(ramp, 0.0), 1.0)

    def fit(self, images: torch.Tensor, device: torch.device, generator: torch.Generator) -> dict[str, float]:
        """Train the encoder and decoder on uint8 ``images`` with random strings."""
        self.device = device
        if self.encoder is None:
            self.build(images.shape[1], tuple(images.shape[-2:]))

        def loss(x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
            bits = torch.randint(0, 2, (len(x), self.fingerprint_length), generator=generator).float().to(device)
            encoded = self.encoder(x, bits)
            logits = self.decoder(rounding_noise(encoded, generator))
            bce = F.binary_cross_entropy_with_logits(logits, bits)
            l2 = F.mse_loss(encoded, x)
            return self.bce_loss_weight * bce + self.l2_weight(step) * l2, {
                "bce": float(bce.detach()),
                "l2": float(l2.detach()),
                "bit_acc": bit_accuracy(logits.detach(), bits),
            }

        steps = self.encoder_epochs * math.ceil(len(images) / self.encoder_batch_size)
        batch = min(self.encoder_batch_size, len(images))
        return train_hiding(
            [self.encoder, self.decoder],
            loss,
            images,
            steps=steps,
            batch_size=batch,
            lr=self.encoder_lr,
            betas=(0.9, 0.999),
            device=device,
            generator=generator,
            name="SSBA encoder",
        )

    def prepare(self, ctx: AttackContext) -> None:
        train = ctx.dataset.train
        generator = torch.Generator().manual_seed(ctx.seed())
        with torch.random.fork_rng(devices=[]):  # the networks' initial weights, from the run's seed
            torch.manual_seed(ctx.seed())
            self.build(train.images.shape[1], tuple(train.images.shape[-2:]))
        self.fit(train.images, ctx.device, generator)
        sample = train.images[torch.randperm(len(train), generator=generator)[:1000]]
        encoded = to_uint8(self.apply(sample.float() / 255)).float() / 255
        self.stats = {
            "bit_accuracy": bit_accuracy(self.decode(encoded), self.bits.expand(len(encoded), -1)),
            "mean_abs_residual": float((encoded - sample.float() / 255).abs().mean() * 255),
        }
        log.info(
            "SSBA: the decoder reads the string from %d encoded training images (uint8) at bit accuracy "
            "%.4f; mean |residual| %.2f / 255",
            len(sample),
            self.stats["bit_accuracy"],
            self.stats["mean_abs_residual"],
        )

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's bit logits for images ``x``."""
        return in_batches(self.decoder, x.float(), self.device).float()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        bits = self.bits.to(self.device)
        return in_batches(lambda b: self.encoder(b, bits.expand(len(b), -1)), x, self.device)

    def state(self) -> dict[str, Any]:
        return {}  # the encoder is fixed before the victim trains; a resumed run trains it again

    def extras(self) -> dict[str, torch.Tensor]:
        return {
            "secret_bits": self.bits.clone(),
            "bit_accuracy": torch.tensor(self.stats.get("bit_accuracy", 0.0)),
            "mean_abs_residual": torch.tensor(self.stats.get("mean_abs_residual", 0.0)),
        }


if __name__ == "__main__":
    main("ssba")
