"""Blind backdoor: Bagdasaryan and Shmatikov, "Blind Backdoors in Deep Learning Models",
USENIX Security 2021.

A code-level attack: the attacker's code sits in the victim's loss computation and never
touches the training data. For every (augmented) training batch it makes a backdoor copy
of the whole batch (the trigger stamped on every image, every label set to the
attacker's) and trains on a blend of the two losses,

    loss = s_normal * CE(f(x), y) + s_backdoor * CE(f(B(x)), t(y)),

with fixed scales (``weight_loss_balance_mode: fixed``) or scales found by MGDA (multiple
gradient descent, ``MGDA``): the convex combination of the two tasks' gradients of least
norm, each gradient first divided by a normaliser (``mgda_normalize``: ``loss+`` = min(loss
* ||g||, 10), ``loss`` = min(loss, 10), ``l2`` = ||g||, ``none``). For two tasks the
weight of the backdoor task is gamma = <g_n - g_b, g_n> / ||g_b - g_n||^2, with 0.999 or
0.001 where the least-norm point is a corner. The attack waits until the victim has
learnt its task: while fewer than ``batch_history_len`` batches have been seen, or the
mean clean loss over the last ``batch_history_len`` batches is at least
``backdoor_batch_loss_threshold``, the loss is the clean loss alone.

The trigger is BackdoorBench's (the authors' PatternSynthesizer): a 5x3 pattern of white
(1), black (0) and untouched pixels,

    1 0 1
    . 1 .
    . . 0
    . 1 .
    1 0 1

at row 3, column 23 of a 32x32 image; on other sizes at the same relative place (row
round(3 H / 32), column round(23 W / 32)), moved inwards where the pattern would leave the
image. The backdoor test set is the non-target test images with the pattern; no poisoned
training set exists (``bd_train`` is None). The record keeps ``extras["pattern"]`` and
``extras["mask"]`` (H x W).

Hyperparameters (BackdoorBench's config/attack/blind/default.yaml):
    weight_loss_balance_mode: fixed (or MGDA, BackdoorBench's cifar10_mgda.yaml)
    mgda_normalize: loss+
    fix_scale_normal_weight: 1.0
    fix_scale_backdoor_weight: 0.9
    batch_history_len: 1000 (batches)
    backdoor_batch_loss_threshold: 1.0

Per-dataset values: digits uses batch_history_len 20: BackdoorBench's 1000 batches are
2.6% of its CIFAR-10 run (391 batches x 100 epochs); the same share of the digits recipe's
690 batches is 18 (1000 would never attack; config/attack/blind/digits.yaml), of the
Fashion-MNIST recipe's 2345 batches 60 (config/attack/blind/fashion_mnist.yaml).

Deviations from BackdoorBench: the backdoor copy and the batch go through the victim in one
forward pass, so that BatchNorm's batch statistics are those of the mix, as at test time
(BackdoorBench's two passes let the victim tell an all-triggered batch by its statistics:
on digits, C-Acc 0.76 at a training loss of 0.008, against 0.997 for the clean model); the
clean loss is averaged over the last ``batch_history_len`` batches (BackdoorBench: the last
1000, whatever batch_history_len is; the same at the default); the classifier's optimizer and schedule are the dataset's
recipe; the trigger's place scales with the image (BackdoorBench refuses images where row
3, column 23 does not fit).

    python attack/blind.py --dataset digits --save_folder_name blind_digits
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from attack.base import Attack, AttackContext, Training, main, register_attack
from utils.config import non_negative, positive
from utils.errors import UserError
from utils.poison import target_labels

# The authors' pattern: 1 white, 0 black, -1 untouched.
PATTERN = torch.tensor([[1.0, 0.0, 1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 0.0], [-1.0, 1.0, -1.0], [1.0, 0.0, 1.0]])
PLACE = (3, 23)  # top-left corner on a 32x32 image


def pattern_and_mask(size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (H, W) pattern values and its 0/1 mask, placed as on a 32x32 image."""
    h, w = size
    ph, pw = PATTERN.shape
    if h < ph or w < pw:
        raise UserError(f"blind: the 5x3 pattern needs images of at least 5x3, got {h}x{w}")
    top = min(round(PLACE[0] * h / 32), h - ph)
    left = min(round(PLACE[1] * w / 32), w - pw)
    pattern, mask = torch.zeros(h, w), torch.zeros(h, w)
    pattern[top : top + ph, left : left + pw] = PATTERN.clamp(min=0)
    mask[top : top + ph, left : left + pw] = (PATTERN >= 0).float()
    return pattern, mask


def stamp(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (1 - mask) + pattern mask, every channel."""
    mask = mask.to(x.device, x.dtype)
    return x * (1 - mask) + pattern.to(x.device, x.dtype) * mask


def min_norm_weight(v1v1: float, v1v2: float, v2v2: float) -> float:
    """The gamma in [0.001, 0.999] minimising ||gamma g1 + (1 - gamma) g2||^2 from the dot
    products (the authors' MGDA for two tasks)."""
    if v1v2 >= v1v1:
        return 0.999
    if v1v2 >= v2v2:
        return 0.001
    return (v2v2 - v1v2) / (v1v1 + v2v2 - 2 * v1v2)


def gradient_normalizer(loss: float, grads: Sequence[torch.Tensor], kind: str) -> float:
    """What MGDA divides a task's gradient by."""
    if kind in ("none", "eq"):
        return 1.0
    norm = float(torch.sqrt(sum(g.float().pow(2).sum() for g in grads)))
    if kind == "l2":
        return norm
    if kind == "loss":
        return min(loss, 10.0)
    return min(loss * norm, 10.0)  # loss+


def mgda_scales(
    losses: dict[str, torch.Tensor], grads: dict[str, Sequence[torch.Tensor]], normalize: str
) -> dict[str, float]:
    """MGDA's scales of two tasks (the first key is gamma's task)."""
    first, second = list(losses)
    scaled = {}
    for task in (first, second):
        norm = gradient_normalizer(float(losses[task].detach()), grads[task], normalize) + 1e-5
        scaled[task] = [g.float() / norm for g in grads[task]]

    def dot(a: str, b: str) -> float:
        return float(sum((u * v).sum() for u, v in zip(scaled[a], scaled[b])))

    gamma = min_norm_weight(dot(first, first), dot(first, second), dot(second, second))
    return {first: gamma, second: 1 - gamma}


class LossHistory(nn.Module):
    """The last ``length`` clean losses (a ring buffer; a module, so checkpoints keep it)."""

    def __init__(self, length: int):
        super().__init__()
        self.register_buffer("values", torch.zeros(length, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def push(self, value: float) -> None:
        self.values[int(self.count) % len(self.values)] = value
        self.count += 1

    def stable(self, threshold: float) -> bool:
        """Full, and its mean below ``threshold``."""
        return int(self.count) >= len(self.values) and float(self.values.mean()) < threshold


@register_attack("blind")
class Blind(Attack):
    """Blind: backdoor loss on a triggered copy of every batch, blended with the clean loss, training-controlled.

    Args:
        weight_loss_balance_mode: fixed scales or MGDA
        mgda_normalize: MGDA's gradient normaliser (loss+, loss, l2, none)
        fix_scale_normal_weight: fixed scale of the clean loss
        fix_scale_backdoor_weight: fixed scale of the backdoor loss
        batch_history_len: batches of clean loss seen (and averaged) before the attack may start
        backdoor_batch_loss_threshold: the attack starts once the mean clean loss is below this
    """

    kind = "training-controlled"
    paper = "Bagdasaryan and Shmatikov, Blind Backdoors in Deep Learning Models, USENIX Security 2021"
    year = 2021

    param_checks = {
        "fix_scale_normal_weight": non_negative,
        "fix_scale_backdoor_weight": non_negative,
        "batch_history_len": positive,
        "backdoor_batch_loss_threshold": non_negative,
    }
    smoke_params = {"batch_history_len": 5}

    def __init__(
        self,
        weight_loss_balance_mode: Literal["fixed", "MGDA"] = "fixed",
        mgda_normalize: Literal["loss+", "loss", "l2", "none"] = "loss+",
        fix_scale_normal_weight: float = 1.0,
        fix_scale_backdoor_weight: float = 0.9,
        batch_history_len: int = 1000,
        backdoor_batch_loss_threshold: float = 1.0,
    ):
        self.weight_loss_balance_mode = weight_loss_balance_mode
        self.mgda_normalize = mgda_normalize
        self.fix_scale_normal_weight = fix_scale_normal_weight
        self.fix_scale_backdoor_weight = fix_scale_backdoor_weight
        self.batch_history_len = batch_history_len
        self.backdoor_batch_loss_threshold = backdoor_batch_loss_threshold
        self.history = LossHistory(batch_history_len)
        self.pattern: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.last_scales: dict[str, float] = {"normal": 1.0}

    def prepare(self, ctx: AttackContext) -> None:
        self.pattern, self.mask = pattern_and_mask(ctx.dataset.info.size)
        self._target, self._label_trans, self._num_classes = ctx.target, ctx.label_trans, ctx.num_classes

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.pattern is None or self.pattern.shape != x.shape[-2:]:
            self.pattern, self.mask = pattern_and_mask(tuple(x.shape[-2:]))
        return stamp(x, self.pattern, self.mask)

    def scales(self, model: nn.Module, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """The scales of the backdoor and clean losses (fixed, or MGDA's from their gradients)."""
        if self.weight_loss_balance_mode == "fixed":
            return {"backdoor": self.fix_scale_backdoor_weight, "normal": self.fix_scale_normal_weight}
        params = [p for p in model.parameters() if p.requires_grad]
        grads = {task: torch.autograd.grad(loss, params, retain_graph=True) for task, loss in losses.items()}
        return mgda_scales(losses, grads, self.mgda_normalize)

    def train_step(
        self, training: Training, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = training.model
        self.history.to(x.device)
        attacking = self.history.stable(self.backdoor_batch_loss_threshold)
        losses = {}
        if attacking:  # one forward pass: BatchNorm sees the mix, as at test time
            y_bd = target_labels(y, self._label_trans, self._target, self._num_classes)
            logits_bd, logits = model(torch.cat([self.apply(x), x])).split(len(x))
            losses["backdoor"] = F.cross_entropy(logits_bd, y_bd)
        else:
            logits = model(x)
        losses["normal"] = F.cross_entropy(logits, y)
        self.last_scales = self.scales(model, losses) if attacking else {"normal": 1.0}
        loss = sum(self.last_scales[task] * value for task, value in losses.items())
        self.history.push(float(losses["normal"].detach()))
        return loss, logits, y

    def extras(self) -> dict[str, torch.Tensor]:
        return {"pattern": self.pattern.clone(), "mask": self.mask.clone()}


if __name__ == "__main__":
    main("blind")
