"""SAU: Shared Adversarial Unlearning. Wei, Zhang, Zha and Wu, "Shared Adversarial
Unlearning: Backdoor Mitigation by Unlearning Shared Adversarial Examples", NeurIPS 2023
(arXiv:2307.10562).

Idea: the adversarial risk of the backdoored model on its poisoned samples is bounded by
the risk on *shared* adversarial examples: perturbations that fool both the model being
purified and the backdoored model, towards the same label. SAU alternates (Alg. 1): for
each batch of the defender's clean data, find shared adversarial examples
(:class:`defense.sae.SharedAdversarialExamples`), then take one step on

    lmd_1 * CE(f(x), y) + lmd_2 * CE(f(x + delta), y) + lmd_3 * L_sar
    L_sar = -(1 / B) * sum over samples where f_ref(x + delta) is wrong and differs from
            f_ref(x) of log(1 - p_f(f_ref(x + delta) | x + delta)),

which keeps clean accuracy and pushes f away from the backdoored model's label on the
shared adversarial examples.

Hyperparameters (BackdoorBench's reference configuration, config/defense/sau/):
    epochs: unlearning rounds, one pass over the clean subset each (100; tiny: 20)
    batch_size: batch size (256)
    lr: Adam learning rate, amsgrad, no weight decay, constant (1e-4)
    norm_type: norm of the perturbation ball, L_inf, L2 or L1 (L_inf)
    trigger_norm: radius of the perturbation ball in [0, 1] pixel space (0.2)
    adv_lr: step size of the perturbation search (0.2)
    adv_steps: steps of the perturbation search (5)
    pgd_init: initial perturbation, max, min, random (BackdoorBench's: uniform in [0, 1), projected) or zero (max)
    beta_1: weight of L_adv in the search (0.01)
    beta_2: weight of L_share in the search (1)
    lmd_1: weight of the clean loss (1)
    lmd_2: weight of adversarial training on x + delta (0)
    lmd_3: weight of the shared adversarial risk L_sar (1)
    outer_steps: unlearning steps per found perturbation (1)
    train_mode: BatchNorm in training mode during unlearning (off: BN statistics stay frozen)
    lr_scheduler: per-round schedule, none (constant) or CosineAnnealingLR (none)

Deviations, each small and stated:
* L_sar is computed exactly in log space, log(1 - p_k) = logsumexp_{j != k} z_j - logsumexp_j z_j;
  BackdoorBench averages two clamped forms of the same quantity (clamps at 1e-3 / 0.999).
* The search stops *before* a step once every sample is shared; BackdoorBench takes one
  more step after the check (a step with zero gradient, so the same delta).
* The JS divergence of L_share (probabilities clamped at 1e-8) and pgd_init: random
  (torch.rand_like, then projected) are BackdoorBench's (see :mod:`defense.sae`).
* L1 balls use the exact Euclidean projection; BackdoorBench rescales.
* BackdoorBench builds a cosine scheduler for SAU but never steps it, so its learning rate
  is constant; here the default is no scheduler (the same constant rate), and
  lr_scheduler: CosineAnnealingLR steps a cosine over the rounds (a flag, off by default).

Cost (nothing here changes a number): the search runs on the active set (see
:mod:`defense.sae`); the backdoored model's labels on the clean subset, which the search
and L_sar need every round, are computed once (SAU searches on the unaugmented clean
images, so they never change); non-finite values are checked once a round (the message
still names the first bad batch), not with a host sync per batch. On the CPU, models with
convolutions run in channels_last memory format (oneDNN's faster kernels, about 25% less
time a search step measured on cnn and preactresnet18): the same function, with other
floating-point rounding (logits within 1e-8 on cnn), so a CPU run's numbers are not bit
for bit those of a run in the default layout; the returned model is contiguous again.
``memory_format: contiguous`` keeps the default layout (every number as the reference loop's,
as ``benchmarks/sau_speed.py --exact-only`` runs it); ``benchmarks/sau_layout.py`` measures
what the layout does to the final numbers over seeds (docs/results.md).

--resume continues the unlearning rounds exactly (the model, Adam's state, the shuffling
and random states are checkpointed; the reference model is the record's).
"""

from __future__ import annotations

import utils.boot  # noqa: F401  (first, before torch: Ctrl-C while loading is one line)

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from defense.base import Defense, DefenseData, frozen_copy, main, register_defense
from defense.sae import SAEResult, SharedAdversarialExamples
from utils import config as cfg
from utils.train import batches, make_optimizer, make_scheduler


def shared_adversarial_risk(
    logits_adv: torch.Tensor, pred_ref_adv: torch.Tensor, pred_ref_clean: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """L_sar: -(1/B) sum over the samples where the backdoored model's label on x + delta
    is wrong and differs from its label on x, of log(1 - p_f(that label | x + delta))."""
    mask = (pred_ref_adv != labels) & (pred_ref_adv != pred_ref_clean)
    z = logits_adv[mask].float()  # no sample: an empty sum, 0 (no host sync to check)
    k = pred_ref_adv[mask]
    others = z.masked_fill(F.one_hot(k, z.shape[1]).bool(), float("-inf"))
    log_one_minus_p = torch.logsumexp(others, dim=1) - torch.logsumexp(z, dim=1)
    return -log_one_minus_p.sum() / len(labels)


def memory_format_for(
    model: nn.Module, device: torch.device, choice: Literal["auto", "contiguous", "channels_last"] = "auto"
) -> torch.memory_format:
    """The memory layout SAU runs ``model`` in. ``auto``: channels_last on the CPU for models
    with 2-D convolutions (measured: about 25% less time a search step for cnn and
    preactresnet18 with oneDNN), the default layout otherwise (CUDA, models without
    convolutions)."""
    if choice == "auto":
        convolutional = any(isinstance(m, nn.Conv2d) for m in model.modules())
        choice = "channels_last" if device.type == "cpu" and convolutional else "contiguous"
    return torch.channels_last if choice == "channels_last" else torch.contiguous_format


@register_defense("sau")
class SAU(Defense):
    """Shared Adversarial Unlearning (Wei et al., NeurIPS 2023): unlearn shared adversarial examples.

    Args:
        epochs: unlearning rounds, one pass over the clean subset each
        batch_size: batch size of the search and the unlearning step
        lr: Adam (amsgrad) learning rate, constant
        norm_type: norm of the perturbation ball
        trigger_norm: radius of the perturbation ball in [0, 1] pixel space
        adv_lr: step size of the perturbation search
        adv_steps: maximum steps of the perturbation search
        pgd_init: initial perturbation
        beta_1: weight of L_adv in the search
        beta_2: weight of L_share in the search
        lmd_1: weight of the clean cross-entropy
        lmd_2: weight of the cross-entropy on x + delta (adversarial training; off by default)
        lmd_3: weight of the shared adversarial risk L_sar
        outer_steps: unlearning steps per found perturbation
        train_mode: BatchNorm in training mode during unlearning
        lr_scheduler: per-round learning-rate schedule (none: constant, as BackdoorBench runs it)
        memory_format: memory layout during the run (auto: channels_last for conv models on the CPU; contiguous: exact)
    """

    paper = "Wei, Zhang, Zha and Wu, Shared Adversarial Unlearning, NeurIPS 2023, arXiv:2307.10562"
    year = 2023
    # python -m defense tune's search space: the unlearning rate, the ball, the search's
    # steps, the loss weights and the rounds (the clean weight lmd_1 stays 1: a scale).
    search_space = {
        "lr": ("float_log", 1e-5, 1e-3),
        "trigger_norm": ("float", 0.1, 0.4),
        "adv_steps": ("int", 3, 10),
        "lmd_2": ("float", 0.0, 1.0),
        "lmd_3": ("float_log", 0.1, 10.0),
        "epochs": ("int", 10, 100),
    }
    param_aliases = {"epochs": ("n_rounds",)}
    smoke_params = {"epochs": 2}
    params_added_later = frozenset({"memory_format"})  # results before it ran "auto"
    param_checks = {
        "epochs": cfg.non_negative,
        "batch_size": cfg.positive,
        "lr": cfg.positive,
        "trigger_norm": cfg.positive,
        "adv_lr": cfg.positive,
        "adv_steps": cfg.positive,
        "outer_steps": cfg.positive,
    }

    def __init__(
        self,
        epochs: int = 100,
        batch_size: int = 256,
        lr: float = 1e-4,
        norm_type: Literal["L_inf", "L2", "L1"] = "L_inf",
        trigger_norm: float = 0.2,
        adv_lr: float = 0.2,
        adv_steps: int = 5,
        pgd_init: Literal["max", "random", "zero", "min"] = "max",
        beta_1: float = 0.01,
        beta_2: float = 1.0,
        lmd_1: float = 1.0,
        lmd_2: float = 0.0,
        lmd_3: float = 1.0,
        outer_steps: int = 1,
        train_mode: bool = False,
        lr_scheduler: Literal["none", "CosineAnnealingLR"] = "none",
        memory_format: Literal["auto", "contiguous", "channels_last"] = "auto",
    ):
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.norm_type, self.trigger_norm, self.adv_lr = norm_type, trigger_norm, adv_lr
        self.adv_steps, self.pgd_init = adv_steps, pgd_init
        self.beta_1, self.beta_2 = beta_1, beta_2
        self.lmd_1, self.lmd_2, self.lmd_3 = lmd_1, lmd_2, lmd_3
        self.outer_steps, self.train_mode = outer_steps, train_mode
        self.lr_scheduler, self.memory_format = lr_scheduler, memory_format

    def mitigate(self, model: nn.Module, data: DefenseData) -> nn.Module:
        fmt = memory_format_for(model, data.device, self.memory_format)
        model.to(memory_format=fmt)
        model_ref = frozen_copy(model)
        model.eval()
        sae = SharedAdversarialExamples(
            model,
            model_ref,
            bound=self.trigger_norm,
            step_size=self.adv_lr,
            steps=self.adv_steps,
            norm=self.norm_type,
            init=self.pgd_init,
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            amp=data.amp,
        )
        optimizer = make_optimizer(model.parameters(), "adam", self.lr, weight_decay=0.0)
        scheduler = make_scheduler(optimizer, self.lr_scheduler, self.epochs)
        generator = data.generator()
        epochs = data.epochs(self.epochs, model=model, optimizer=optimizer, scheduler=scheduler, generator=generator)
        x_all, y_all = data.tensors()
        clean_pred_ref = sae.reference_predictions(x_all)  # f_ref is frozen and x unaugmented: once
        for epoch in epochs:
            terms: list[dict[str, torch.Tensor]] = []
            rates, sizes = [], []
            # the order data.batches(self.batch_size, generator=generator) gives, as indices
            for step, (idx, y) in enumerate(
                batches(
                    torch.arange(len(y_all)),
                    y_all,
                    batch_size=self.batch_size,
                    device=data.device,
                    shuffle=True,
                    generator=generator,
                )
            ):
                x = x_all[idx].contiguous(memory_format=fmt)
                found = sae.search(x, y, clean_pred_ref[idx])
                # non-finite values are checked once a round, at data.report (one host sync)
                data.check(found.delta, epoch=epoch, batch=step, what="shared adversarial perturbation", defer=True)
                for _ in range(self.outer_steps):
                    step_terms = self.unlearning_step(model, optimizer, data, x, y, found, epoch, step)
                terms.append(step_terms)
                rates.append((found.stats.shared, found.stats.fooled, found.stats.fooled_ref))
                sizes.append(len(y))
            if scheduler is not None:
                scheduler.step()
            seen = max(sum(sizes), 1)
            values = torch.stack([torch.stack(list(t.values())) for t in terms]).cpu() if terms else None
            sums = {}
            for j, key in enumerate(("loss", "loss_cl", "loss_at", "loss_sar")):
                sums[key] = sum(float(values[i, j]) * n for i, n in enumerate(sizes)) if terms else 0.0
            for j, key in enumerate(("shared_rate", "fooled_rate", "fooled_ref_rate")):
                sums[key] = sum(r[j] * n for r, n in zip(rates, sizes))
            data.report(epoch, model, **{k: v / seen for k, v in sums.items()})
        return model.to(memory_format=torch.contiguous_format).eval()

    def unlearning_step(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: DefenseData,
        x: torch.Tensor,
        y: torch.Tensor,
        found: SAEResult,
        epoch: int,
        step: int,
    ) -> dict[str, torch.Tensor]:
        """One step on lmd_1 * L_clean + lmd_2 * L_adv-train + lmd_3 * L_sar (``found``: the
        batch's shared adversarial examples); returns the terms as detached tensors (no
        host sync: the loss is checked at the round's end)."""
        model.train(self.train_mode)
        with data.autocast():
            logits, logits_adv = model(torch.cat([x, x + found.delta])).float().split(len(x))
        model.eval()
        loss_cl = F.cross_entropy(logits, y)
        loss_at = F.cross_entropy(logits_adv, y)
        loss_sar = shared_adversarial_risk(logits_adv, found.pred_ref, found.clean_pred_ref, y)
        loss = self.lmd_1 * loss_cl + self.lmd_2 * loss_at + self.lmd_3 * loss_sar
        data.step(loss, optimizer, epoch=epoch, batch=step, defer_check=True)
        return {
            "loss": loss.detach(),
            "loss_cl": loss_cl.detach(),
            "loss_at": loss_at.detach(),
            "loss_sar": loss_sar.detach(),
        }


if __name__ == "__main__":
    main("sau")
