"""Speed work that must change no number: SAU's active-set search against the dense
search, the one evaluation pass per test image, the reuse of an evaluation of an
unchanged model, and float32 evaluation under autocast."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from defense.base import Monitor, frozen_copy
from defense.sae import SharedAdversarialExamples, adversarial_loss, project, share_loss
from utils.metrics import Metrics, evaluate


def dense_search(sae: SharedAdversarialExamples, images: torch.Tensor, labels: torch.Tensor):
    """The search as it was before the active set: every sample through every step."""
    with torch.no_grad():
        clean_pred = sae.model(images).argmax(1)
        clean_pred_ref = sae.model_ref(images).argmax(1)
    delta = sae.initial(images)
    steps = 0
    while True:
        delta.requires_grad_(steps < sae.steps)
        with torch.set_grad_enabled(steps < sae.steps):
            logits, logits_ref = sae.model(images + delta), sae.model_ref(images + delta)
        pred, pred_ref = logits.argmax(1), logits_ref.argmax(1)
        fooled, fooled_ref = pred != clean_pred, pred_ref != clean_pred_ref
        shared = fooled & fooled_ref & (pred == pred_ref)
        if bool(shared.all()) or steps == sae.steps:
            break
        loss = (sae.beta_1 * adversarial_loss(logits, logits_ref, labels, fooled, fooled_ref)
                + sae.beta_2 * share_loss(logits, logits_ref, shared))
        (grad,) = torch.autograd.grad(loss, delta)
        delta = project(delta.detach() - sae.step_size * grad.sign(), sae.norm, sae.bound)
        steps += 1
    return delta.detach(), fooled, fooled_ref, shared, pred_ref, steps


def tiny_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("norm,init", [("L_inf", "max"), ("L_inf", "random"), ("L_inf", "zero"), ("L2", "max"),
                                       ("L1", "random")])
def test_the_active_set_search_gives_the_dense_search_numbers_with_fewer_passes(norm, init):
    f, f_ref = tiny_cnn(0), tiny_cnn(1)
    torch.manual_seed(2)
    x, y = torch.rand(48, 1, 6, 6), torch.randint(0, 3, (48,))
    bound = {"L_inf": 0.3, "L2": 2.0, "L1": 6.0}[norm]
    sae = SharedAdversarialExamples(f, frozen_copy(f_ref), bound=bound, step_size=0.1, steps=6, norm=norm,
                                    init=init, amp=False)
    torch.manual_seed(3)
    delta, fooled, fooled_ref, shared, pred_ref, steps = dense_search(sae, x, y)
    rows: list[int] = []
    f.register_forward_hook(lambda m, i, o: rows.append(len(i[0])))
    torch.manual_seed(3)
    got = sae(x, y)
    assert torch.equal(got, delta)
    assert sae.stats.steps == steps
    assert sae.stats.shared == shared.float().mean().item() and 0 < sae.stats.shared < 1  # some, not all
    assert sae.stats.fooled == fooled.float().mean().item()
    assert sae.stats.fooled_ref == fooled_ref.float().mean().item()
    assert torch.equal(sae.pred_ref, pred_ref)
    # the samples already shared are left out of the later passes
    assert rows[0] == 48 and rows[1] == 48 and rows[-1] < 48 and rows == sorted(rows, reverse=True)


def test_cached_reference_labels_give_the_same_search():
    f, f_ref = tiny_cnn(0), frozen_copy(tiny_cnn(1))
    torch.manual_seed(2)
    x, y = torch.rand(20, 1, 6, 6), torch.randint(0, 3, (20,))
    sae = SharedAdversarialExamples(f, f_ref, bound=0.3, step_size=0.1, steps=4, amp=False)
    calls: list[int] = []
    f_ref.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    delta = sae(x, y)
    without = len(calls)
    calls.clear()
    cached = sae.reference_predictions(x)
    assert calls == [20] and torch.equal(cached, sae.clean_pred_ref)
    calls.clear()
    assert torch.equal(sae(x, y, cached), delta)
    assert len(calls) == without - 1  # no pass over x for f_ref's clean labels
