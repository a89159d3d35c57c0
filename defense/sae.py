"""Shared adversarial examples (SAE): the inner maximisation of Shared Adversarial
Unlearning (Wei et al., NeurIPS 2023, arXiv:2307.10562, Sec. 4 and Alg. 1).

A perturbation delta is *shared* on a sample when it fools both the model being purified
(f) and the backdoored reference model (f_ref), and both predict the same label on
x + delta. Backdoor triggers are such perturbations, so unlearning shared adversarial
examples removes the backdoor without needing the trigger.

The generator minimises, by signed projected gradient steps on delta only,

    beta_1 * L_adv + beta_2 * L_share
    L_adv   = -(1 / 2B) * sum over models m, over samples m is not yet fooled on, of CE(m(x + delta), y)
    L_share =  (1 / B)  * sum over samples not yet shared of JS(softmax f(x + delta) || softmax f_ref(x + delta))

where a model is fooled on a sample when its prediction on x + delta differs from its
prediction on x, and JS is the Jensen-Shannon divergence (natural log).

As in BackdoorBench's ``Shared_PGD`` (defense/sau.py there): the JS divergence is computed
from softmax probabilities clamped at 1e-8 (a class with a smaller probability passes no
gradient), and ``init="random"`` draws delta uniformly in [0, 1) (``torch.rand_like``) and
projects it, so for L_inf every coordinate lands in [0, bound], most of them at bound.
``init="min"`` starts at -bound.

The search runs on the *active set*: a sample that is shared after a step is left out of
every later forward and backward pass. This changes no number. A shared sample is fooled
by both models, so it is masked out of L_adv for both and out of L_share: its gradient is
exactly zero, its signed step is zero, and delta - step_size * 0 is delta bit for bit; the
projection is still applied to every row (it is per row and cheap), so delta is the same
tensor the dense search would produce. With the models in eval mode (no batch statistics)
every sample's forward and backward pass is independent of the others, and the loss keeps
the full batch size in its denominators. The search ends when no sample is active or
after ``steps`` steps. (For L2 and L1 the projection of a point already on the sphere may
move it by a rounding error; the dense search would then see the shared sample's
prediction on that rounded delta, the active set keeps the prediction it had when it
became shared. For L_inf, the default, the clamp is exact.)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from utils.runtime import autocast, sign_scale

Norm = Literal["L_inf", "L2", "L1"]
Init = Literal["max", "random", "zero", "min"]


def js_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per-sample Jensen-Shannon divergence between softmax(logits_p) and softmax(logits_q),
    as BackdoorBench computes it: probabilities clamped at 1e-8, natural log."""
    p = F.softmax(logits_p.float(), dim=1).clamp(min=1e-8)
    q = F.softmax(logits_q.float(), dim=1).clamp(min=1e-8)
    log_m = (0.5 * (p + q)).log()
    return (0.5 * (p * p.log() + q * q.log()) - 0.5 * (p * log_m + q * log_m)).sum(1)


def adversarial_loss(
    logits: torch.Tensor,
    logits_ref: torch.Tensor,
    labels: torch.Tensor,
    fooled: torch.Tensor,
    fooled_ref: torch.Tensor,
    batch_size: int | None = None,
) -> torch.Tensor:
    """L_adv: minus the cross-entropy to the true label, counted for each model only on
    the samples it is not yet fooled on, averaged over the batch (``batch_size``, default
    the number of rows) and both models."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    ce_ref = F.cross_entropy(logits_ref.float(), labels, reduction="none")
    return -(ce[~fooled].sum() + ce_ref[~fooled_ref].sum()) / (2 * (batch_size or len(labels)))


def share_loss(
    logits: torch.Tensor, logits_ref: torch.Tensor, shared: torch.Tensor, batch_size: int | None = None
) -> torch.Tensor:
    """L_share: the JS divergence between the two models' predictions, summed over the
    samples that are not yet shared, divided by the batch size (default: the number of rows)."""
    return js_divergence(logits, logits_ref)[~shared].sum() / (batch_size or len(shared))


def project(delta: torch.Tensor, norm: Norm, bound: float) -> torch.Tensor:
    """Euclidean projection of each sample's perturbation onto the ``norm`` ball of radius
    ``bound``."""
    if norm == "L_inf":
        return delta.clamp(-bound, bound)
    flat = delta.flatten(1)
    if norm == "L2":
        scale = (bound / flat.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
        return (flat * scale[:, None]).view_as(delta)
    if norm == "L1":
        return _project_l1(flat, bound).view_as(delta)
    raise ValueError(f"unknown norm '{norm}' (L_inf, L2 or L1)")


def _project_l1(v: torch.Tensor, radius: float) -> torch.Tensor:
    """Rows of ``v`` projected onto the L1 ball (Duchi et al. 2008, sort-based)."""
    a = v.abs()
    inside = a.sum(1) <= radius
    mu, _ = a.sort(dim=1, descending=True)
    cums = mu.cumsum(1) - radius
    ks = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
    rho = ((mu - cums / ks) > 0).to(v.dtype).mul(ks).argmax(1)  # last index where the condition holds
    theta = (cums.gather(1, rho[:, None]) / (rho[:, None] + 1).to(v.dtype)).clamp_min(0)
    out = v.sign() * (a - theta).clamp_min(0)
    return torch.where(inside[:, None], v, out)


@contextlib.contextmanager
def no_param_grads(*models: nn.Module) -> Iterator[None]:
    """Turn off parameter gradients for the duration (only delta needs them)."""
    saved = [(p, p.requires_grad) for m in models for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@dataclass
class SAEStats:
    """How the last search ended: shares of the batch fooling f, f_ref, both (with the
    same label: shared), and the number of steps taken."""

    fooled: float
    fooled_ref: float
    shared: float
    steps: int


@dataclass
class SAEResult:
    """One search's outcome: the perturbation ``delta`` (N x C x H x W, detached), f_ref's
    labels on x + delta (``pred_ref``) and on x (``clean_pred_ref``), and :class:`SAEStats`."""

    delta: torch.Tensor
    pred_ref: torch.Tensor
    clean_pred_ref: torch.Tensor
    stats: SAEStats


class SharedAdversarialExamples:
    """Shared adversarial perturbations for two models (SAU's inner maximisation).

    Distance measure: L_inf (default), L2 or L1 on the perturbation, per sample, in
    [0, 1] pixel space; x + delta is not clipped to [0, 1] (as in BackdoorBench and i-BAU).

    Args:
        model: the model being purified (f), in eval mode.
        model_ref: the backdoored reference model (f_ref), in eval mode.
        bound: radius of the norm ball (0.2).
        step_size: size of each signed gradient step (0.2).
        steps: maximum number of steps (5).
        norm: ``"L_inf"``, ``"L2"`` or ``"L1"``.
        init: ``"max"`` (delta = +bound, then projected), ``"min"`` (-bound), ``"random"``
            (uniform in [0, 1), projected, as BackdoorBench) or ``"zero"``.
        beta_1: weight of L_adv (0.01).
        beta_2: weight of L_share (1).
        amp: autocast the forward passes on CUDA.

    Shape:
        images: (N, C, H, W) floats in [0, 1]; labels: (N,) int64 -> delta: (N, C, H, W).

    Example:
        >>> sae = SharedAdversarialExamples(model, frozen_copy(model))
        >>> found = sae.search(images, labels)
        >>> found.delta, found.stats.shared  # the perturbation; share of the batch on which it is shared

    ``sae(images, labels)`` (deprecated) returns ``found.delta`` and keeps the rest as the
    attributes ``stats``, ``pred_ref`` and ``clean_pred_ref`` of the generator.
    """

    def __init__(
        self,
        model: nn.Module,
        model_ref: nn.Module,
        bound: float = 0.2,
        step_size: float = 0.2,
        steps: int = 5,
        norm: Norm = "L_inf",
        init: Init = "max",
        beta_1: float = 0.01,
        beta_2: float = 1.0,
        amp: bool = True,
    ):
        if bound <= 0 or step_size <= 0 or steps < 1:
            raise ValueError("bound and step_size must be > 0 and steps >= 1")
        if norm not in ("L_inf", "L2", "L1") or init not in ("max", "random", "zero", "min"):
            raise ValueError(f"unknown norm '{norm}' or init '{init}'")
        self.model, self.model_ref = model, model_ref
        self.bound, self.step_size, self.steps = bound, step_size, steps
        self.norm, self.init = norm, init
        self.beta_1, self.beta_2 = beta_1, beta_2
        self.amp = amp
        self.stats = SAEStats(0.0, 0.0, 0.0, 0)
        # f_ref's predictions on x and on x + delta at the end of the last search
        self.pred_ref: torch.Tensor | None = None
        self.clean_pred_ref: torch.Tensor | None = None

    def initial(self, images: torch.Tensor) -> torch.Tensor:
        if self.init == "max":
            delta = torch.full_like(images, self.bound)
        elif self.init == "min":
            delta = torch.full_like(images, -self.bound)
        elif self.init == "random":  # BackdoorBench: torch.rand_like, then the projection
            delta = torch.rand_like(images)
        else:
            delta = torch.zeros_like(images)
        return project(delta, self.norm, self.bound)

    @torch.no_grad()
    def reference_predictions(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """f_ref's labels on ``images`` (its clean predictions: f_ref never changes, so a
        caller may compute them once and pass them to every search)."""
        with autocast(images.device, self.amp):
            return torch.cat(
                [self.model_ref(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)]
            )

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, clean_pred_ref: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Deprecated (use :meth:`search`): delta for ``images``; the search's labels and
        rates are left on the generator (``pred_ref``, ``clean_pred_ref``, ``stats``)."""
        found = self.search(images, labels, clean_pred_ref)
        self.stats, self.pred_ref, self.clean_pred_ref = found.stats, found.pred_ref, found.clean_pred_ref
        return found.delta

    def search(
        self, images: torch.Tensor, labels: torch.Tensor, clean_pred_ref: torch.Tensor | None = None
    ) -> SAEResult:
        """The shared adversarial perturbation of ``images`` and how the search ended;
        ``clean_pred_ref``: f_ref's labels on ``images`` when known
        (:meth:`reference_predictions`), else computed here."""
        device, n = images.device, len(images)
        scale = sign_scale(device, self.amp)  # only the gradient's sign is used
        with no_param_grads(self.model, self.model_ref):
            with torch.no_grad(), autocast(device, self.amp):
                clean_pred = self.model(images).argmax(1)
                if clean_pred_ref is None:
                    clean_pred_ref = self.model_ref(images).argmax(1)
            delta = self.initial(images)
            # each sample's state at its last forward pass (a dropped sample's stays as it was)
            pred_ref = torch.empty_like(clean_pred_ref)
            fooled = torch.zeros(n, dtype=torch.bool, device=device)
            fooled_ref, shared = torch.zeros_like(fooled), torch.zeros_like(fooled)
            active = torch.arange(n, device=device)  # samples not yet shared
            steps = 0
            while True:
                last = steps == self.steps  # the last check needs no gradient
                x, d = images[active], delta[active].requires_grad_(not last)
                with torch.set_grad_enabled(not last), autocast(device, self.amp):
                    logits = self.model(x + d)
                    logits_ref = self.model_ref(x + d)
                pred_a, pred_ref_a = logits.argmax(1), logits_ref.argmax(1)
                fooled_a, fooled_ref_a = pred_a != clean_pred[active], pred_ref_a != clean_pred_ref[active]
                shared_a = fooled_a & fooled_ref_a & (pred_a == pred_ref_a)
                pred_ref[active], fooled[active], fooled_ref[active], shared[active] = (
                    pred_ref_a,
                    fooled_a,
                    fooled_ref_a,
                    shared_a,
                )
                if last or bool(shared_a.all()):
                    break
                loss = self.beta_1 * adversarial_loss(
                    logits, logits_ref, labels[active], fooled_a, fooled_ref_a, n
                ) + self.beta_2 * share_loss(logits, logits_ref, shared_a, n)
                (grad,) = torch.autograd.grad(loss * scale, d)
                step = torch.zeros_like(delta)  # zero for the samples left out: their gradient is zero
                step[active] = grad.sign()
                delta = project(delta - self.step_size * step, self.norm, self.bound)
                active = active[~shared_a]
                steps += 1
        rates = torch.stack([fooled, fooled_ref, shared]).float().mean(1).tolist()
        return SAEResult(delta.detach(), pred_ref, clean_pred_ref, SAEStats(rates[0], rates[1], rates[2], steps))
